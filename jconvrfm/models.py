"""Flax reference CNNs for the Convolutional Neural Feature Ansatz (public re-exports).

Every conv is an `AnalysableConv`: the gradient of the logits w.r.t. its pre-activation and,
in generic mode, w.r.t. its explicit patch tensor are available for all analysed layers from
one reverse pass per logit (`logit_gradients`).
"""

from jconvrfm._src.models.alexnet import AlexNet
from jconvrfm._src.models.analysis import analysed_layers
from jconvrfm._src.models.analysis import layer_kernel
from jconvrfm._src.models.analysis import logit_gradients
from jconvrfm._src.models.analysis import zero_perturbations
from jconvrfm._src.models.layers import adaptive_avg_pool
from jconvrfm._src.models.layers import AnalysableConv
from jconvrfm._src.models.myrtle import Myrtle
from jconvrfm._src.models.resnet import BasicBlock
from jconvrfm._src.models.resnet import ResNet
from jconvrfm._src.models.resnet import resnet18
from jconvrfm._src.models.vanilla import VanillaCNN
from jconvrfm._src.models.vgg import VGG
from jconvrfm._src.models.vgg import vgg11

__all__ = [
    'AlexNet', 'AnalysableConv', 'BasicBlock', 'Myrtle', 'ResNet', 'VGG', 'VanillaCNN',
    'adaptive_avg_pool', 'analysed_layers', 'layer_kernel', 'logit_gradients', 'resnet18',
    'vgg11', 'zero_perturbations',
]
