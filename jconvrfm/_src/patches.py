"""Extraction of q x q image patches in Flax kernel feature order.

A q x q patch of a c-channel map is a vector of length `d = q*q*c` whose feature index is
`(u*q + v)*c + ch` for row offset `u`, column offset `v` and channel `ch`: the order in which a
Flax `Conv` kernel of shape `(q, q, c, k)` reshapes to `(d, k)`. With that order

  `patches(x, q, stride=s, padding=p) @ kernel.reshape(d, k)`

equals the convolution `lax.conv_general_dilated(x, kernel, (s, s), p,
dimension_numbers=('NHWC', 'HWIO', 'NHWC'))` for `p` in {VALID, SAME}; CIRCULAR is the same
convolution of the periodically wrapped image (output size as for SAME).

References:
  D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
  convolutional neural networks. arXiv:2309.00570, 2023 (patches `p_ij(x)` of Section 2).
"""

import functools
from typing import Tuple, Union

import jax
import jax.numpy as jnp

from jconvrfm._src import checks


def padding_amounts(size: int, patch_size: int, stride: int,
                    padding: checks.Padding) -> Tuple[int, int, int]:
  """Padding before/after one spatial axis and the resulting output length.

  Follows `lax.conv_general_dilated`: VALID pads nothing and gives
  `floor((size - q) / stride) + 1` positions; SAME (and CIRCULAR) give `ceil(size / stride)`
  positions with `pad_total = max((out - 1) * stride + q - size, 0)` split as
  `(pad_total // 2, pad_total - pad_total // 2)`, i.e. the extra row/column goes at the end.

  Args:
    size: input length along the axis (height or width).
    patch_size: q.
    stride: step between neighbouring patches.
    padding: a `Padding`.

  Returns:
    `(pad_before, pad_after, output_size)`; `output_size` may be <= 0 for VALID when
    `q > size` (callers reject that).
  """
  if padding == checks.Padding.VALID:
    return 0, 0, (size - patch_size) // stride + 1
  out = -(-size // stride)
  total = max((out - 1) * stride + patch_size - size, 0)
  return total // 2, total - total // 2, out


def output_shape(height: int, width: int, patch_size: int, stride: int = 1,
                 padding: Union[str, checks.Padding] = 'VALID') -> Tuple[int, int]:
  """Spatial output shape `(H', W')` of `patches` (and of the matching convolution)."""
  padding = checks.canonical_padding(padding)
  return (padding_amounts(height, patch_size, stride, padding)[2],
          padding_amounts(width, patch_size, stride, padding)[2])


@functools.partial(jax.jit, static_argnames=('patch_size', 'stride', 'padding'))
def _patches(x: jax.Array, patch_size: int, stride: int,
             padding: checks.Padding) -> jax.Array:
  """Unchecked patch extraction; see `patches`."""
  _, height, width, _ = x.shape
  q = patch_size
  top, bottom, out_h = padding_amounts(height, q, stride, padding)
  left, right, out_w = padding_amounts(width, q, stride, padding)
  if padding != checks.Padding.VALID:
    mode = 'wrap' if padding == checks.Padding.CIRCULAR else 'constant'
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), mode=mode)
  # One strided slice per offset (u, v): no FLOPs, only data movement, and the offsets come
  # out in the (u, v, ch) order of a Flax kernel (conv_general_dilated_patches would give the
  # channel-major order (ch, u, v) and cost a d x d identity convolution).
  span_h = (out_h - 1) * stride + 1
  span_w = (out_w - 1) * stride + 1
  rows = []
  for u in range(q):
    cols = [x[:, u:u + span_h:stride, v:v + span_w:stride, :] for v in range(q)]
    rows.append(jnp.stack(cols, axis=3))  # (n, H', W', q, c)
  p = jnp.stack(rows, axis=3)  # (n, H', W', q, q, c)
  return p.reshape(p.shape[:3] + (-1,))


def patches(x: jax.Array,
            patch_size: int,
            *,
            stride: int = 1,
            padding: Union[str, checks.Padding] = 'VALID') -> jax.Array:
  """All q x q patches of a batch of NHWC images, as vectors in Flax kernel order.

  Overlapping patches are written out as independent copies (memory `q*q` times the image for
  stride 1). The result is differentiable (`grad`), batchable (`vmap`) and jit-compatible; the
  compiled extraction is cached per input shape, dtype, `patch_size`, `stride` and `padding`.

  Args:
    x: images, shape `(n, H, W, c)` (NHWC), any real floating dtype (kept in the output;
      integer/bool input is converted to the default float dtype). Must be finite and non-empty.
    patch_size: q >= 1, the side of the square patch.
    stride: step >= 1 between neighbouring patches (both spatial axes).
    padding: `'VALID'`, `'SAME'` or `'CIRCULAR'` (any case) or a `jconvrfm.Padding`. SAME pads
      with zeros exactly as `lax.conv_general_dilated` does (extra row/column at the end);
      CIRCULAR pads by periodic wrap-around with SAME's amounts and output size.

  Returns:
    Array of shape `(n, H', W', d)`, `d = q*q*c`, dtype of `x`. Entry `[a, i, j, (u*q+v)*c+ch]`
    is `x_padded[a, i*stride + u, j*stride + v, ch]`; `H' = floor((H - q)/stride) + 1` for VALID
    and `ceil(H / stride)` otherwise (likewise `W'`).

  Raises:
    ValueError: wrong rank, empty batch, NaN/Inf, `patch_size` larger than the image with
      VALID padding, or an unknown padding name.
    TypeError: non-integer `patch_size`/`stride` or a non-floating dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> from jconvrfm import patches
    >>> x = jnp.arange(16.0, dtype=jnp.float32).reshape(1, 4, 4, 1)
    >>> p = patches(x, 3)
    >>> p.shape
    (1, 2, 2, 9)
    >>> p[0, 0, 0].tolist()
    [0.0, 1.0, 2.0, 4.0, 5.0, 6.0, 8.0, 9.0, 10.0]

  References:
    D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
    convolutional neural networks. arXiv:2309.00570, 2023.
  """
  x = checks.check_nhwc(x, 'x')
  q = checks.check_positive_int(patch_size, 'patch_size')
  s = checks.check_positive_int(stride, 'stride')
  pad = checks.canonical_padding(padding)
  _, height, width, _ = x.shape
  if pad == checks.Padding.VALID and (q > height or q > width):
    raise ValueError(
        f'`patch_size` ({q}) must not exceed the image height and width ({height} x {width}) '
        'with VALID padding; use SAME or CIRCULAR padding or a smaller patch.')
  return _patches(x, q, s, pad)
