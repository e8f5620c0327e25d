"""`conv_ntk`: the ConvRFM base kernel (CNTK / CNNGP) with a patch metric.

References:
  D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
  convolutional neural networks. arXiv:2309.00570, 2023.
  S. Arora et al. On Exact Computation with an Infinitely Wide Neural Net. NeurIPS 2019.
"""

import enum
from typing import Optional, Union

import jax
import jax.numpy as jnp

from jconvrfm._src import checks
from jconvrfm._src.kernels import fused
from jconvrfm._src.kernels import nt as nt_lib

Kind = fused.Kind


class Impl(enum.Enum):
  """How `conv_ntk` computes the kernel."""
  FUSED = 'fused'  # closed form from patch Grams (fast, memory-light).
  NT = 'nt'  # neural-tangents `stax` on expanded images (the reference).


def canonical_impl(impl: Union[str, Impl], name: str = 'impl') -> Impl:
  """Normalises `'fused'` / `'nt'` (any case) or an `Impl` to `Impl`."""
  return checks.canonical_enum(impl, Impl, name)


def conv_ntk(x1: jax.Array,
             x2: Optional[jax.Array] = None,
             *,
             depth: int,
             patch_size: int,
             padding: Union[str, checks.Padding] = 'VALID',
             metric: Optional[jax.Array] = None,
             kind: Union[str, Kind] = 'ntk',
             impl: Union[str, Impl] = 'fused') -> jax.Array:
  """Infinite-width NTK (or NNGP) of the paper's CNN, with a patch metric in layer one.

  The network: `depth` x [Conv(q x q, stride 1, W_std = q, b_std = 0, `padding`),
  ABRelu(a=0, b=sqrt(2))], Flatten, Dense(1, W_std = 1, b_std = 0), in neural-tangents' NTK
  parameterisation. The metric `M` replaces the first layer's patch inner products `p^T p'`
  by `p^T M p'` (the network sees `M^(1/2) p`).

  Args:
    x1: images `(n1, H, W, c)` (NHWC), real floating dtype; the output has this dtype.
    x2: images `(n2, H, W, c)` of the same dtype, or None for `x1` (then `n2 = n1`, and
      the fused path evaluates the diagonal `K(x, x)` with its exact zero angle, avoiding
      the arccos kink at cos t = 1 that costs about 1e-4 relative accuracy in float32).
    depth: number of Conv + ReLU blocks, >= 1.
    patch_size: q, the conv window of every layer.
    padding: `'VALID'`, `'SAME'` or `'CIRCULAR'` (any case) or a `jconvrfm.Padding`, for
      every conv layer.
    metric: `M`, symmetric PSD `(d, d)`, `d = q*q*c`, features in Flax kernel order
      `(u*q + v)*c + ch`; same dtype as the images. None means `M = I`.
    kind: `'ntk'` or `'nngp'`.
    impl: `'fused'` (closed form from patch Grams; jit/vmap/grad-safe in `x1`, `x2`,
      `metric`) or `'nt'` (neural-tangents on expanded images; the reference).

  Returns:
    Kernel matrix `(n1, n2)` in the dtype of `x1`.

  Raises:
    ValueError: wrong rank, NaN/Inf, mismatched shapes of `x1`/`x2`, a patch larger than
      the image (VALID), a depth that VALID convolutions cannot fit, a metric that is not
      symmetric PSD of size `d`, or an unknown `padding`/`kind`/`impl`.
    TypeError: non-floating inputs, mismatched dtypes, non-integer `depth`/`patch_size`.

  Example:
    >>> import jax.numpy as jnp
    >>> import jconvrfm
    >>> x = jnp.linspace(0, 1, 2 * 8 * 8, dtype=jnp.float32).reshape(2, 8, 8, 1)
    >>> k = jconvrfm.conv_ntk(x, depth=2, patch_size=3)
    >>> k.shape, k.dtype
    ((2, 2), dtype('float32'))

  References:
    D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning
    in convolutional neural networks. arXiv:2309.00570, 2023.
  """
  kind = fused.canonical_kind(kind)
  impl = canonical_impl(impl)
  pad = checks.canonical_padding(padding)
  depth = checks.check_positive_int(depth, 'depth')
  q = checks.check_positive_int(patch_size, 'patch_size')
  x1c, x2c = fused._check_pair(x1, x2, q, pad)  # pylint: disable=protected-access
  _, height, width, c = x1c.shape
  out_h, out_w = (height - q + 1, width - q + 1) if pad == checks.Padding.VALID else (
      height, width)
  fused.check_depth_fits(out_h, out_w, depth, q, pad)
  metric = fused._check_metric(metric, q * q * c, x1c.dtype)  # pylint: disable=protected-access
  if impl == Impl.FUSED:
    k = fused.fused_conv_kernel(x1c, x2c, metric, depth, q, pad, kind)
    if x2 is None:  # exact diagonal: K(x, x) has angle 0 at every layer.
      diag = fused.fused_self_kernel(x1c, metric, depth, q, pad, kind)
      idx = jnp.arange(k.shape[0])
      k = k.at[idx, idx].set(diag)
    return k
  return nt_lib.nt_conv_kernel(x1c, None if x2 is None else x2c, metric, depth, q, pad,
                               kind)
