"""VGG-11 (configuration "A"), with or without batch norm, in torchvision's layout.

Module names follow torchvision's state-dict names with `.` replaced by `_` (`features_0`,
`features_3`, ..., `classifier_0`, `classifier_3`, `classifier_6`) so pretrained weights map
one to one (see `jconvrfm._src.pretrained`). Every conv is analysed.

References:
  K. Simonyan, A. Zisserman. Very deep convolutional networks for large-scale image
  recognition. ICLR 2015.
  torchvision.models.vgg11 / vgg11_bn (layer layout and names).
"""

from typing import Any, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from jconvrfm._src.models import layers

VGG11_CFG = (64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M')


class VGG(nn.Module):
  """VGG feature stack (3x3 convs, padding 1, ReLU, 2x2 max pools), adaptive average pool to
  `pool_size`, and the three-layer classifier (Linear-ReLU-Dropout x2, Linear).

  Attributes:
    num_classes: logits.
    cfg: widths and `'M'` (max pool) markers; default VGG-11 "A".
    batch_norm: BatchNorm after every conv (torchvision `vgg11_bn`).
    hidden: classifier width (4096 in torchvision).
    pool_size: adaptive-average-pool output size (7, 7) in torchvision.
    dropout: classifier dropout rate (needs a `'dropout'` rng when `train=True`).
    generic, param_dtype, kernel_init: as in `AnalysableConv`.

  Input `(n, H, W, 3)` with H, W multiples of 32 (224 for ImageNet, 32 for CIFAR);
  output `(n, num_classes)`. The classifier flattens NHWC features; the torchvision loader
  permutes the first Linear's input dimension from NCHW order accordingly.

  >>> import jax, jax.numpy as jnp
  >>> m = VGG(num_classes=10, cfg=(8, 'M', 16, 'M'), hidden=32, pool_size=(2, 2))
  >>> v = m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  >>> m.apply(v, jnp.zeros((2, 32, 32, 3))).shape
  (2, 10)
  """
  num_classes: int = 1000
  cfg: Sequence[Union[int, str]] = VGG11_CFG
  batch_norm: bool = False
  hidden: int = 4096
  pool_size: Tuple[int, int] = (7, 7)
  dropout: float = 0.5
  kernel_init: layers.Initializer = nn.initializers.lecun_normal()
  generic: bool = False
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    idx = 0
    for v in self.cfg:
      if v == 'M':
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        idx += 1
        continue
      x = layers.AnalysableConv(
          int(v), 3, padding=1, generic=self.generic, kernel_init=self.kernel_init,
          param_dtype=self.param_dtype, name=f'features_{idx}')(x)
      idx += 1
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         param_dtype=self.param_dtype, name=f'features_{idx}')(x)
        idx += 1
      x = nn.relu(x)
      idx += 1
    x = layers.adaptive_avg_pool(x, self.pool_size)
    x = x.reshape(x.shape[0], -1)
    for i, features in ((0, self.hidden), (3, self.hidden)):
      x = nn.Dense(features, param_dtype=self.param_dtype, name=f'classifier_{i}')(x)
      x = nn.relu(x)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, param_dtype=self.param_dtype, name='classifier_6')(x)


def vgg11(num_classes: int = 1000, *, batch_norm: bool = False, **kwargs) -> VGG:
  """VGG-11 (configuration "A"); `batch_norm=True` gives `vgg11_bn`."""
  return VGG(num_classes=num_classes, cfg=VGG11_CFG, batch_norm=batch_norm, **kwargs)
