"""The neural-tangents path: CNTK via `stax`, expanded images, and a stax kernel adapter.

A patch metric `M` (d x d PSD, `d = q*q*c`) enters a convolutional kernel through its first
layer only: every inner product of same-position patches becomes `p^T M p'`. Any
neural-tangents `stax` model can realise this on an *expanded image*: each stride-1 patch
`p_ij` (padded per `padding`) is written out as the disjoint q x q x c block `S p_ij`,
`S = M^(1/2)`, at block position (i, j), so an `(n, H, W, c)` batch becomes
`(n, H' q, W' q, c)`; a first convolution with window q, **stride q** and VALID padding then
sees exactly the transformed patches. This costs q^2 times the memory of the image; the fused
path (`jconvrfm._src.kernels.fused`) computes the same kernel from patch Grams instead.

References:
  R. Novak et al. Neural Tangents: Fast and Easy Infinite Neural Networks in Python.
  ICLR 2020.
  D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
  convolutional neural networks. arXiv:2309.00570, 2023 (expanded-image construction).
"""

import functools
import math
import types
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

from jconvrfm._src import checks
from jconvrfm._src import patches as patches_lib
from jconvrfm._src.kernels import fused


def import_neural_tangents() -> types.ModuleType:
  """Applies `third_party.nt_compat` and returns the `neural_tangents` module.

  Never imports TensorFlow: `neural_tangents.experimental` (TF interop) is replaced by a
  stub that raises `ImportError` when used.

  Example:
    >>> nt = import_neural_tangents()
    >>> hasattr(nt, 'stax')
    True
  """
  from third_party import nt_compat  # pylint: disable=g-import-not-at-top
  nt_compat.apply()
  import neural_tangents  # pylint: disable=g-import-not-at-top
  return neural_tangents


def _sqrt_psd(m: jax.Array) -> jax.Array:
  """Symmetric PSD square root by eigendecomposition (negative rounding clipped to 0)."""
  try:  # engineer P's implementation, once it has landed.
    from jconvrfm._src.cnfa import sqrt_psd  # pylint: disable=g-import-not-at-top
    return sqrt_psd(m)
  except ImportError:
    w, v = jnp.linalg.eigh((m + m.T) / 2)
    return (v * jnp.sqrt(jnp.maximum(w, 0))) @ v.T


@functools.partial(jax.jit, static_argnames=('q', 'padding'))
def _expand(x, root, q, padding):
  p = patches_lib._patches(x, q, 1, padding)  # pylint: disable=protected-access
  if root is not None:
    p = jnp.einsum('nhwd,ed->nhwe', p, root)
  n, h, w, _ = p.shape
  c = x.shape[-1]
  p = p.reshape(n, h, w, q, q, c).transpose(0, 1, 3, 2, 4, 5)
  return p.reshape(n, h * q, w * q, c)


def expand_patches(x: jax.Array,
                   patch_size: int,
                   *,
                   padding: Union[str, checks.Padding] = 'VALID',
                   metric: Optional[jax.Array] = None) -> jax.Array:
  """Writes every stride-1 patch as a disjoint q x q block, transformed by `M^(1/2)`.

  Args:
    x: images `(n, H, W, c)` (NHWC), real floating dtype (kept).
    patch_size: q.
    padding: padding of the patch extraction (`'VALID'`, `'SAME'`, `'CIRCULAR'`).
    metric: `M`, symmetric PSD `(d, d)`, `d = q*q*c` in Flax kernel order; None = identity.

  Returns:
    `(n, H' q, W' q, c)`: block `[i q:(i+1) q, j q:(j+1) q, :]` holds `S p_ij(x)` reshaped to
    `(q, q, c)`, `S = M^(1/2)` (symmetric root). A conv with window q, stride q and VALID
    padding applied to it gives, at (i, j), the inner products `p_ij^T M p'_ij`.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.arange(16.0, dtype=jnp.float32).reshape(1, 4, 4, 1)
    >>> expand_patches(x, 3).shape
    (1, 6, 6, 1)
  """
  pad = checks.canonical_padding(padding)
  q = checks.check_positive_int(patch_size, 'patch_size')
  x, _ = fused._check_pair(x, None, q, pad)  # pylint: disable=protected-access
  metric = fused._check_metric(metric, q * q * x.shape[-1], x.dtype)  # pylint: disable=protected-access
  root = None if metric is None else _sqrt_psd(metric)
  return _expand(x, root, q, pad)


_NT_PADDING = {checks.Padding.VALID: 'VALID', checks.Padding.SAME: 'SAME',
               checks.Padding.CIRCULAR: 'CIRCULAR'}


@functools.lru_cache(maxsize=64)
def cntk_stax(depth: int, patch_size: int, padding: checks.Padding):
  """The ConvRFM base CNN as a stax model for *expanded* images: `(init, apply, kernel_fn)`.

  depth x [Conv(q x q, W_std=q, b_std=0), ABRelu(0, sqrt 2)], Flatten, Dense(1, W_std=1,
  b_std=0), NTK parameterisation; the first conv has stride q and VALID padding (it reads
  the disjoint blocks of `expand_patches`), later convs stride 1 with `padding`. The returned
  `kernel_fn` is jitted with `get` static.
  """
  nt = import_neural_tangents()
  stax = nt.stax
  q = patch_size
  pad = _NT_PADDING[padding]
  layers = [stax.Conv(1, (q, q), strides=(q, q), padding='VALID', W_std=q, b_std=0.0),
            stax.ABRelu(0.0, math.sqrt(2.0))]
  for _ in range(depth - 1):
    layers += [stax.Conv(1, (q, q), strides=(1, 1), padding=pad, W_std=q, b_std=0.0),
               stax.ABRelu(0.0, math.sqrt(2.0))]
  layers += [stax.Flatten(), stax.Dense(1, W_std=1.0, b_std=0.0)]
  init_fn, apply_fn, kernel_fn = stax.serial(*layers)
  return init_fn, apply_fn, jax.jit(kernel_fn, static_argnames=('get',))


def stax_conv_kernel(kernel_fn: Callable,
                     *,
                     patch_size: int,
                     padding: Union[str, checks.Padding] = 'VALID',
                     kind: Union[str, fused.Kind] = 'ntk'
                     ) -> Callable[..., jax.Array]:
  """Adapts any stax `kernel_fn` into a metric-aware kernel `kernel(x1, x2=None, metric=None)`.

  The returned function expands both batches with `expand_patches(x, patch_size,
  padding=padding, metric=metric)` and evaluates `kernel_fn(e1, e2, kind)`. The user's model
  must therefore start with a convolution of window `(q, q)`, **strides `(q, q)`** and
  **VALID** padding (the padding of the patches is already in the expanded image); its
  later layers are free. With `W_std = q` and `b_std = 0` that first layer sees
  `p^T M p' / c` at each position, as the paper's CNTK does.

  Args:
    kernel_fn: a neural-tangents `kernel_fn(x1, x2, get)` (e.g. from `stax.serial`).
    patch_size: q.
    padding: padding of the patch extraction.
    kind: which kernel to return, `'ntk'` or `'nngp'`.

  Returns:
    `kernel(x1 (n1, H, W, c), x2 (n2, H, W, c) or None, metric (d, d) or None) -> (n1, n2)`.

  Example:
    >>> import jax.numpy as jnp
    >>> nt = import_neural_tangents()
    >>> _, _, kfn = nt.stax.serial(
    ...     nt.stax.Conv(1, (3, 3), strides=(3, 3), padding='VALID', W_std=3.0),
    ...     nt.stax.Relu(), nt.stax.Flatten(), nt.stax.Dense(1))
    >>> kernel = stax_conv_kernel(kfn, patch_size=3)
    >>> kernel(jnp.ones((2, 5, 5, 1), jnp.float32)).shape
    (2, 2)
  """
  kind = fused.canonical_kind(kind)
  q = checks.check_positive_int(patch_size, 'patch_size')
  pad = checks.canonical_padding(padding)

  def kernel(x1, x2=None, metric=None):
    e1 = expand_patches(x1, q, padding=pad, metric=metric)
    e2 = None if x2 is None else expand_patches(x2, q, padding=pad, metric=metric)
    return kernel_fn(e1, e2, kind.value)

  return kernel


def nt_conv_kernel(x1, x2, metric, depth: int, q: int, padding: checks.Padding,
                   kind: fused.Kind) -> jax.Array:
  """Unchecked neural-tangents CNTK/CNNGP `(n1, n2)` of the ConvRFM base CNN."""
  root = None if metric is None else _sqrt_psd(metric)
  e1 = _expand(x1, root, q, padding)
  e2 = None if x2 is None else _expand(x2, root, q, padding)
  _, _, kernel_fn = cntk_stax(depth, q, padding)
  return kernel_fn(e1, e2, kind.value)
