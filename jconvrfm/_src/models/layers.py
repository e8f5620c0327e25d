"""Building blocks shared by the reference CNNs: an analysable convolution and pooling helpers.

`AnalysableConv` is the one convolution every reference model uses. Besides computing the
convolution it exposes, through Flax's `perturb` machinery, the two intermediates the
Convolutional Neural Feature Ansatz needs:

* `'preact'`: the layer's pre-activation before the bias, shape `(n, H', W', k)`; the gradient
  of the logits w.r.t. it is `delta` in `G = W Sigma W^T` (closed-form patch AGOP);
* `'patches'` (only with `generic=True`): the explicit patch tensor `(n, H', W', d)` of the
  layer's input, `d = q*q*c` in Flax kernel order, from which the layer is computed as
  `patches @ W.reshape(d, k)`; the gradient w.r.t. it is the generic patch-AGOP route.

Perturbations are zero variables in the `'perturbations'` collection: a model applied without
that collection is unchanged, and a model applied with zero perturbations gives gradients
w.r.t. every analysed intermediate in a single backward pass.

References:
  D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
  convolutional neural networks. arXiv:2309.00570, 2023.
"""

from typing import Any, Callable, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jconvrfm._src import checks

PaddingLike = Union[str, checks.Padding, int, Sequence[Tuple[int, int]]]
Initializer = Callable[..., jax.Array]

PREACT = 'preact'
PATCHES = 'patches'
PERTURBATIONS = 'perturbations'


def explicit_padding(padding: PaddingLike, in_hw: Tuple[int, int], kernel_size: Tuple[int, int],
                     strides: Tuple[int, int]) -> Tuple[checks.Padding, Tuple[Tuple[int, int], ...]]:
  """Resolves a padding spec to `(mode, ((top, bottom), (left, right)))`.

  Args:
    padding: `'VALID'`, `'SAME'` (as `lax.conv_general_dilated`: the extra row/column goes at
      the end), `'CIRCULAR'` (wrap-around, same amounts as SAME), an int `p` (torch-style
      symmetric zero padding), or explicit `((top, bottom), (left, right))` zero padding.
    in_hw: input height and width.
    kernel_size: `(q_h, q_w)`.
    strides: `(s_h, s_w)`.

  Returns:
    The padding mode (`Padding.CIRCULAR` for wrap-around, else `Padding.VALID` meaning zero
    padding by the returned amounts followed by a VALID convolution) and the amounts.
  """
  if isinstance(padding, bool):
    raise TypeError(f'`padding` must be a string, int or pairs of ints, got {padding!r}.')
  if isinstance(padding, int):
    if padding < 0:
      raise ValueError(f'`padding` must be >= 0, got {padding}.')
    return checks.Padding.VALID, ((padding, padding), (padding, padding))
  if isinstance(padding, (str, checks.Padding)):
    mode = checks.canonical_padding(padding)
    if mode == checks.Padding.VALID:
      return mode, ((0, 0), (0, 0))
    pads = []
    for size, q, s in zip(in_hw, kernel_size, strides):
      out = -(-size // s)
      total = max((out - 1) * s + q - size, 0)
      pads.append((total // 2, total - total // 2))
    return (checks.Padding.CIRCULAR if mode == checks.Padding.CIRCULAR else
            checks.Padding.VALID), tuple(pads)
  try:
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  except (TypeError, ValueError) as e:
    raise TypeError(
        f'`padding` must be VALID/SAME/CIRCULAR, an int, or ((top, bottom), (left, right)), '
        f'got {padding!r}.') from e
  if len(pads) != 2 or any(p < 0 for pair in pads for p in pair):
    raise ValueError(f'`padding` must be two non-negative (lo, hi) pairs, got {padding!r}.')
  return checks.Padding.VALID, pads


class AnalysableConv(nn.Module):
  """2-D convolution (NHWC input, HWIO kernel) exposing its pre-activation and patches.

  Attributes:
    features: number of filters `k`.
    kernel_size: `(q, q)` (or an int `q`).
    strides: `(s, s)` (or an int).
    padding: see `explicit_padding`.
    use_bias: add a bias after the pre-activation perturbation.
    analysed: register the `'preact'` (and in generic mode `'patches'`) perturbations.
    generic: compute the layer as `patches(x) @ W.reshape(d, k)` with the patch tensor
      `(n, H', W', d)` as an explicit, perturbable intermediate (the CNFA's generic form).
      Uses `jconvrfm._src.patches.patches`; the result equals the convolution to rounding.
    kernel_init, bias_init: initialisers; the kernel has shape `(q, q, c, k)`.
    param_dtype: dtype of the parameters (computation follows the promoted input dtype).

  Input: `x` of shape `(n, H, W, c)`. Output: `(n, H', W', k)`.
  """
  features: int
  kernel_size: Union[int, Tuple[int, int]] = (3, 3)
  strides: Union[int, Tuple[int, int]] = (1, 1)
  padding: PaddingLike = 'SAME'
  use_bias: bool = True
  analysed: bool = True
  generic: bool = False
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f'`x` must have rank 4 (NHWC), got shape {tuple(x.shape)}.')
    ks = (self.kernel_size,) * 2 if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
    st = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
    c = x.shape[-1]
    kernel = self.param('kernel', self.kernel_init, (*ks, c, self.features), self.param_dtype)
    dtype = jnp.result_type(x.dtype, kernel.dtype)
    x = x.astype(dtype)
    kernel = kernel.astype(dtype)
    mode, pads = explicit_padding(self.padding, x.shape[1:3], ks, st)
    if mode == checks.Padding.CIRCULAR:
      x = jnp.pad(x, ((0, 0), *pads, (0, 0)), mode='wrap')
      pads = ((0, 0), (0, 0))
    if self.generic:
      if ks[0] != ks[1] or st[0] != st[1]:
        raise ValueError('generic mode needs square kernels and equal strides, got '
                         f'kernel_size={ks}, strides={st}.')
      from jconvrfm._src.patches import patches as _patches  # pylint: disable=g-import-not-at-top
      if any(p for pair in pads for p in pair):
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
      p = _patches(x, ks[0], stride=st[0], padding='VALID')
      if self.analysed:
        p = self.perturb(PATCHES, p)
      y = p @ kernel.reshape(-1, self.features)
    else:
      y = lax.conv_general_dilated(
          x, kernel, window_strides=st, padding=pads,
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.analysed:
      y = self.perturb(PREACT, y)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
      y = y + bias.astype(dtype)
    return y


def adaptive_avg_pool(x: jax.Array, output_size: Tuple[int, int]) -> jax.Array:
  """torch's `AdaptiveAvgPool2d` on NHWC input `(n, H, W, c)` -> `(n, oh, ow, c)`.

  Output cell `i` averages input rows `floor(i*H/oh)` to `ceil((i+1)*H/oh) - 1` (and likewise
  for columns), exactly as torch does, so that pretrained classifiers see the same features.
  """
  n, h, w, c = x.shape
  oh, ow = output_size
  if (h, w) == (oh, ow):
    return x

  def pool_matrix(size, out):
    rows = []
    for i in range(out):
      lo, hi = (i * size) // out, -(-((i + 1) * size) // out)
      rows.append(jnp.zeros((size,), x.dtype).at[lo:hi].set(1.0 / (hi - lo)))
    return jnp.stack(rows)  # (out, size)

  ph, pw = pool_matrix(h, oh), pool_matrix(w, ow)
  return jnp.einsum('ih,jw,nhwc->nijc', ph, pw, x)


def layer_name(path: Sequence[str]) -> str:
  """Module path `('layer1_0', 'conv1')` -> `'layer1_0/conv1'`."""
  return '/'.join(path)
