"""jconvrfm: the Convolutional Neural Feature Ansatz and (Deep) ConvRFM in JAX.

This module only re-exports; implementations live in `jconvrfm._src`, one file per concept.
`import jconvrfm` never imports TensorFlow (datasets live in `jconvrfm.data`, imported
explicitly) and applies `third_party.nt_compat` before neural-tangents is imported.

References:
  D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
  convolutional neural networks. arXiv:2309.00570, 2023.
"""

__version__ = '0.1.0'

from jconvrfm._src.checks import Padding

# --- patches, patch AGOP, CNFA measures -----------------------------------------------------
# (jconvrfm/_src/patches.py, agop.py, cnfa.py)
from jconvrfm._src.agop import conv_agop
from jconvrfm._src.agop import patch_agop
from jconvrfm._src.cnfa import cnfm
from jconvrfm._src.cnfa import correlation
from jconvrfm._src.cnfa import matrix_power_psd
from jconvrfm._src.cnfa import sqrt_psd
from jconvrfm._src.patches import patches

# --- kernels -------------------------------------------------------------------------------
# (jconvrfm/_src/kernels/)
from jconvrfm._src.kernels.api import conv_ntk
from jconvrfm._src.kernels.api import Impl as KernelImpl
from jconvrfm._src.kernels.fused import conv_kernel_from_grams
from jconvrfm._src.kernels.fused import Kind as KernelKind
from jconvrfm._src.kernels.fused import patch_grams
from jconvrfm._src.kernels.nt import expand_patches
from jconvrfm._src.kernels.nt import import_neural_tangents
from jconvrfm._src.kernels.nt import stax_conv_kernel

# --- tiled kernel matrices -----------------------------------------------------------------
# (jconvrfm/_src/tiling.py)
from jconvrfm._src.tiling import kernel_matrix

# --- ConvRFM and Deep ConvRFM --------------------------------------------------------------
# (jconvrfm/_src/convrfm.py, deep_convrfm.py)
from jconvrfm._src.convrfm import best_round as convrfm_best_round
from jconvrfm._src.convrfm import ConvRFMConfig
from jconvrfm._src.convrfm import ConvRFMState
from jconvrfm._src.convrfm import convrfm_fit
from jconvrfm._src.convrfm import convrfm_init
from jconvrfm._src.convrfm import convrfm_predict
from jconvrfm._src.convrfm import convrfm_step
from jconvrfm._src.convrfm import metric_from_agop
from jconvrfm._src.convrfm import RoundRecord
from jconvrfm._src.deep_convrfm import deep_convrfm_fit
from jconvrfm._src.deep_convrfm import deep_convrfm_predict
from jconvrfm._src.deep_convrfm import deep_featurize
from jconvrfm._src.deep_convrfm import DeepConvRFMConfig
from jconvrfm._src.deep_convrfm import DeepConvRFMState
from jconvrfm._src.deep_convrfm import sample_filters
from jconvrfm._src.predictor_agop import predictor_agop_autodiff
from jconvrfm._src.predictor_agop import predictor_agop_from_grams
from jconvrfm._src.ridge import ridge_solve

# --- models, training, CNFA report ---------------------------------------------------------
# (jconvrfm/_src/models/, train.py, cnfa_report.py; the models are in `jconvrfm.models`)
from jconvrfm import models
from jconvrfm._src.cnfa_report import cnfa_report
from jconvrfm._src.cnfa_report import layer_agops
from jconvrfm._src.cnfa_report import LayerRecord as CnfaLayerRecord
