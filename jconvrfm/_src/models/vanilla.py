"""The paper's vanilla CNN: `depth` bias-free 3x3 convolutions with ReLU, Flatten, linear readout.

References:
  D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
  convolutional neural networks. arXiv:2309.00570, 2023 (Section 3, MNIST/CIFAR CNNs).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jconvrfm._src.models import layers


class VanillaCNN(nn.Module):
  """`depth` x [Conv(q x q, `width`, no bias), ReLU], Flatten, Dense(`num_classes`).

  Analysed layers are named `conv_0`, ..., `conv_{depth-1}`.

  Attributes:
    num_classes: number of logits.
    width: filters per conv layer.
    depth: number of conv layers.
    patch_size: `q`.
    padding: conv padding (`'SAME'` keeps the spatial size).
    kernel_init: conv kernel initialiser; `nn.initializers.normal(0.005)` is the paper's small
      initialisation, the default is Flax's standard `lecun_normal`.
    readout_init: initialiser of the final Dense kernel.
    generic: compute every conv as `patches @ W` (see `AnalysableConv`).
    param_dtype: parameter dtype.

  Input `(n, H, W, c)`, output logits `(n, num_classes)`.

  >>> import jax, jax.numpy as jnp
  >>> m = VanillaCNN(num_classes=10, width=8, depth=2)
  >>> v = m.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  >>> m.apply(v, jnp.zeros((2, 28, 28, 1))).shape
  (2, 10)
  """
  num_classes: int
  width: int = 64
  depth: int = 4
  patch_size: int = 3
  padding: layers.PaddingLike = 'SAME'
  kernel_init: layers.Initializer = nn.initializers.lecun_normal()
  readout_init: layers.Initializer = nn.initializers.lecun_normal()
  generic: bool = False
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no batch norm or dropout
    for i in range(self.depth):
      x = layers.AnalysableConv(
          self.width, self.patch_size, padding=self.padding, use_bias=False,
          generic=self.generic, kernel_init=self.kernel_init, param_dtype=self.param_dtype,
          name=f'conv_{i}')(x)
      x = nn.relu(x)
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes, use_bias=False, kernel_init=self.readout_init,
                    param_dtype=self.param_dtype, name='readout')(x)
