"""Myrtle-5/7/10 CNNs (conv-ReLU stacks with 2x2 average pooling, global pooling at the end).

References:
  V. Shankar, A. Fang, W. Guo, S. Fridovich-Keil, L. Schmidt, J. Ragan-Kelley, B. Recht.
  Neural kernels without tangents. ICML 2020 (the Myrtle architectures, after D. Page's
  "myrtle.ai" fast CIFAR-10 ResNet).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jconvrfm._src.models import layers

# Convolutions per stage (stages are separated by 2x2 average pooling).
MYRTLE_STAGES = {5: (2, 1, 1), 7: (2, 2, 2), 10: (3, 3, 3)}


class Myrtle(nn.Module):
  """Myrtle-`depth`: Conv-ReLU x s0, AvgPool2, Conv-ReLU x s1, AvgPool2, Conv-ReLU x s2, global
  average pooling, Dense.

  `(s0, s1, s2)` is `(2, 1, 1)`, `(2, 2, 2)` or `(3, 3, 3)` for depth 5, 7, 10 (depth counts
  conv layers plus the readout). Shankar et al. pool 8x8 -> 1x1 with three more 2x2 pools on
  32x32 inputs; a global average is the same there and also works for 28x28 inputs. Convs use
  3x3 kernels, SAME padding and a bias. Analysed layers: `conv_0`, `conv_1`, ...

  Input `(n, H, W, c)` with H, W >= 4; output logits `(n, num_classes)`.

  >>> import jax, jax.numpy as jnp
  >>> m = Myrtle(num_classes=10, width=8, depth=5)
  >>> v = m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  >>> m.apply(v, jnp.zeros((2, 32, 32, 3))).shape
  (2, 10)
  """
  num_classes: int
  width: int = 64
  depth: int = 5
  kernel_init: layers.Initializer = nn.initializers.lecun_normal()
  generic: bool = False
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    if self.depth not in MYRTLE_STAGES:
      raise ValueError(f'`depth` must be one of {sorted(MYRTLE_STAGES)}, got {self.depth}.')
    i = 0
    for stage, count in enumerate(MYRTLE_STAGES[self.depth]):
      for _ in range(count):
        x = layers.AnalysableConv(
            self.width, 3, padding='SAME', generic=self.generic, kernel_init=self.kernel_init,
            param_dtype=self.param_dtype, name=f'conv_{i}')(x)
        x = nn.relu(x)
        i += 1
      if stage < 2:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, param_dtype=self.param_dtype, name='readout')(x)
