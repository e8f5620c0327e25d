"""ResNet-18 (basic blocks, batch norm, skip connections) in torchvision's layout.

Module names follow torchvision's state-dict names with `.` replaced by `_` (`conv1`, `bn1`,
`layer1_0/conv1`, `layer1_0/bn1`, `layer1_0/downsample_0`, ..., `fc`). Analysed layers are the
first conv of every basic block (`layer{s}_{b}/conv1`), as in the paper's reference; their
convs have no bias, and the skip path uses the block input, not the analysed patches, so it
carries no gradient w.r.t. them.

References:
  K. He, X. Zhang, S. Ren, J. Sun. Deep residual learning for image recognition. CVPR 2016.
  torchvision.models.resnet18 (layer layout and names).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jconvrfm._src.models import layers


def _bn(train, param_dtype, name):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      param_dtype=param_dtype, name=name)


class BasicBlock(nn.Module):
  """conv3x3(stride)-BN-ReLU-conv3x3-BN, plus identity or 1x1-conv-BN shortcut, then ReLU."""
  features: int
  strides: int = 1
  generic: bool = False
  kernel_init: layers.Initializer = nn.initializers.lecun_normal()
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = lambda f, q, s, p, analysed, name: layers.AnalysableConv(  # pylint: disable=g-long-lambda
        f, q, strides=s, padding=p, use_bias=False, analysed=analysed,
        generic=self.generic and analysed, kernel_init=self.kernel_init,
        param_dtype=self.param_dtype, name=name)
    y = conv(self.features, 3, self.strides, 1, True, 'conv1')(x)
    y = nn.relu(_bn(train, self.param_dtype, 'bn1')(y))
    y = conv(self.features, 3, 1, 1, False, 'conv2')(y)
    y = _bn(train, self.param_dtype, 'bn2')(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, self.strides, 0, False, 'downsample_0')(x)
      x = _bn(train, self.param_dtype, 'downsample_1')(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet with basic blocks: stem, four stages, global average pool, `fc`.

  Attributes:
    num_classes: logits.
    stage_sizes: blocks per stage; (2, 2, 2, 2) is ResNet-18.
    width: channels of the first stage (64); stages double it.
    small_inputs: CIFAR-style stem (3x3 stride-1 conv, no max pool) instead of torchvision's
      7x7 stride-2 conv and 3x3 stride-2 max pool; only the torchvision stem loads
      ImageNet weights.
    generic, kernel_init, param_dtype: as in `AnalysableConv`.

  Input `(n, H, W, 3)`; output `(n, num_classes)`.

  >>> import jax, jax.numpy as jnp
  >>> m = ResNet(num_classes=10, width=8, small_inputs=True)
  >>> v = m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  >>> m.apply(v, jnp.zeros((2, 32, 32, 3))).shape
  (2, 10)
  """
  num_classes: int = 1000
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  small_inputs: bool = False
  kernel_init: layers.Initializer = nn.initializers.lecun_normal()
  generic: bool = False
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    q, s, p = (3, 1, 1) if self.small_inputs else (7, 2, 3)
    x = layers.AnalysableConv(self.width, q, strides=s, padding=p, use_bias=False,
                              analysed=False, kernel_init=self.kernel_init,
                              param_dtype=self.param_dtype, name='conv1')(x)
    x = nn.relu(_bn(train, self.param_dtype, 'bn1')(x))
    if not self.small_inputs:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, blocks in enumerate(self.stage_sizes):
      for b in range(blocks):
        x = BasicBlock(self.width * 2**stage, strides=2 if (stage > 0 and b == 0) else 1,
                       generic=self.generic, kernel_init=self.kernel_init,
                       param_dtype=self.param_dtype, name=f'layer{stage + 1}_{b}')(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, param_dtype=self.param_dtype, name='fc')(x)


def resnet18(num_classes: int = 1000, **kwargs) -> ResNet:
  """ResNet-18 (torchvision layout)."""
  return ResNet(num_classes=num_classes, stage_sizes=(2, 2, 2, 2), **kwargs)
