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
import numpy as np

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


def _pad_for_patches(x, q, stride, padding):
  """`(x padded like the conv, H', W')`."""
  _, height, width, _ = x.shape
  top, bottom, out_h = padding_amounts(height, q, stride, padding)
  left, right, out_w = padding_amounts(width, q, stride, padding)
  if padding != checks.Padding.VALID:
    mode = 'wrap' if padding == checks.Padding.CIRCULAR else 'constant'
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), mode=mode)
  return x, out_h, out_w


def _patches_by_slices(x, q, stride, padding):
  """One strided slice per offset (u, v): data movement only, (u, v, ch) order.

  Its transpose (pad and add) is the fast reverse pass; compiling it costs about 0.015 s per
  offset, so 1.4-1.9 s for q = 11 (121 offsets) on a 2-core CPU.
  """
  x, out_h, out_w = _pad_for_patches(x, q, stride, padding)
  span_h = (out_h - 1) * stride + 1
  span_w = (out_w - 1) * stride + 1
  rows = []
  for u in range(q):
    cols = [x[:, u:u + span_h:stride, v:v + span_w:stride, :] for v in range(q)]
    rows.append(jnp.stack(cols, axis=3))  # (n, H', W', q, c)
  p = jnp.stack(rows, axis=3)  # (n, H', W', q, q, c)
  return p.reshape(p.shape[:3] + (-1,))


def _patches_by_gather(x, q, stride, padding):
  """The same patches as one gather with precomputed (in-bounds) indices.

  One XLA op whatever q: for q = 11 on 1000 32 x 32 x 3 images it compiled in 0.1 s and ran in
  0.3 s, against 1.9 s and 0.8 s for the slices (2-core CPU). Its transpose is a scatter-add,
  3-5x slower than the slices' one, hence the `custom_jvp` of `_patches`.
  """
  x, out_h, out_w = _pad_for_patches(x, q, stride, padding)
  n, height, width, c = x.shape
  rows = (np.arange(out_h) * stride)[:, None, None, None, None] + np.arange(q)[:, None, None]
  cols = (np.arange(out_w) * stride)[None, :, None, None, None] + np.arange(q)[:, None]
  index = (rows * width + cols) * c + np.arange(c)          # (H', W', q, q, c)
  flat = jnp.take(x.reshape(n, height * width * c), jnp.asarray(index.reshape(-1), jnp.int32),
                  axis=1, mode='clip')
  return flat.reshape(n, out_h, out_w, q * q * c)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _patches_impl(x, patch_size, stride, padding):
  return _patches_by_gather(x, patch_size, stride, padding)


@_patches_impl.defjvp
def _patches_impl_jvp(patch_size, stride, padding, primals, tangents):
  # The map is linear: the tangent is the patches of the tangent, taken by slices so that
  # reverse mode transposes slices (pad and add) rather than the gather (a scatter-add).
  (x,), (dx,) = primals, tangents
  return (_patches_by_gather(x, patch_size, stride, padding),
          _patches_by_slices(dx, patch_size, stride, padding))


# Offsets (q^2) above which `_patches` evaluates by the gather. Inside the fused kernel's
# programs (128 images of 32 x 32 x 3 against themselves, a learned metric, 2-core CPU) the
# slices ran faster at every q (q = 3: 0.12 vs 0.15 s; q = 7: 0.36 vs 0.43 s; q = 11: 0.87 vs
# 1.19 s: XLA fuses them into their consumers), but compiled slower once q is large (q = 7:
# about the same; q = 11: 3.7 vs 2.1 s). Large q pays compilation in every program that
# extracts patches; small q runs them over many tiles.
_GATHER_MIN_OFFSETS = 64


@functools.partial(jax.jit, static_argnames=('patch_size', 'stride', 'padding'))
def _patches(x: jax.Array, patch_size: int, stride: int,
             padding: checks.Padding) -> jax.Array:
  """Unchecked patch extraction; see `patches`.

  Strided slices for `q^2 <= 64`; above, the forward by one gather (fast to compile) and the
  derivatives through the slices (fast reverse pass). Both give exactly the same patches, in
  the (u, v, ch) order of a Flax kernel (`conv_general_dilated_patches` would give the
  channel-major order (ch, u, v) and cost a d x d identity convolution).
  """
  if patch_size * patch_size <= _GATHER_MIN_OFFSETS:
    return _patches_by_slices(x, patch_size, stride, padding)
  return _patches_impl(x, patch_size, stride, padding)


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
