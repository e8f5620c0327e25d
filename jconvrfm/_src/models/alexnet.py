"""AlexNet in torchvision's layout (the single-tower variant of Krizhevsky's "one weird trick").

Module names follow torchvision's state-dict names with `.` replaced by `_` (`features_0`,
`features_3`, `features_6`, `features_8`, `features_10`, `classifier_1`, `classifier_4`,
`classifier_6`). Every conv is analysed.

References:
  A. Krizhevsky. One weird trick for parallelizing convolutional neural networks.
  arXiv:1404.5997, 2014.  torchvision.models.alexnet (layer layout and names).
"""

from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jconvrfm._src.models import layers

ALEXNET_WIDTHS = (64, 192, 384, 256, 256)


class AlexNet(nn.Module):
  """Conv11/4-ReLU-MaxPool3/2, Conv5-ReLU-MaxPool, Conv3-ReLU x3, MaxPool, adaptive average pool
  to `pool_size`, classifier Dropout-Linear-ReLU-Dropout-Linear-ReLU-Linear.

  Attributes:
    num_classes: logits.
    widths: the five conv widths (torchvision: 64, 192, 384, 256, 256).
    hidden: classifier width (4096).
    pool_size: (6, 6) in torchvision.
    dropout: classifier dropout rate (needs a `'dropout'` rng when `train=True`).
    generic, kernel_init, param_dtype: as in `AnalysableConv`.

  Input `(n, H, W, 3)` with H, W >= 63 (224 for ImageNet; the three stride-2 max pools leave
  nothing of smaller images); output `(n, num_classes)`.

  >>> import jax, jax.numpy as jnp
  >>> m = AlexNet(num_classes=10, widths=(8, 8, 8, 8, 8), hidden=16)
  >>> v = m.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  >>> m.apply(v, jnp.zeros((2, 64, 64, 3))).shape
  (2, 10)
  """
  num_classes: int = 1000
  widths: Sequence[int] = ALEXNET_WIDTHS
  hidden: int = 4096
  pool_size: Tuple[int, int] = (6, 6)
  dropout: float = 0.5
  kernel_init: layers.Initializer = nn.initializers.lecun_normal()
  generic: bool = False
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    specs = ((0, 11, 4, 2, True), (3, 5, 1, 2, True), (6, 3, 1, 1, False),
             (8, 3, 1, 1, False), (10, 3, 1, 1, True))
    for width, (idx, q, s, p, pool) in zip(self.widths, specs):
      x = layers.AnalysableConv(width, q, strides=s, padding=p, generic=self.generic,
                                kernel_init=self.kernel_init, param_dtype=self.param_dtype,
                                name=f'features_{idx}')(x)
      x = nn.relu(x)
      if pool:
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
    x = layers.adaptive_avg_pool(x, self.pool_size)
    x = x.reshape(x.shape[0], -1)
    for i, features in ((1, self.hidden), (4, self.hidden)):
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
      x = nn.relu(nn.Dense(features, param_dtype=self.param_dtype, name=f'classifier_{i}')(x))
    return nn.Dense(self.num_classes, param_dtype=self.param_dtype, name='classifier_6')(x)
