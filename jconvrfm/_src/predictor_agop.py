"""Patch AGOP of a kernel predictor `f_c(z) = sum_i alpha_ic K(x_i, z)`, fast.

The ConvRFM metric update needs

  `G = (1/s) sum_z sum_c sum_p grad_{p_p(z)} f_c(z) grad_{p_p(z)} f_c(z)^T`   (d x d)

where `p_p(z)` is the stride-1 q x q patch of `z` at position `p` (with the kernel's padding),
taken as an independent variable and *untransformed* (the kernel sees `S p` with `M = S^2`),
`c` runs over the classes and `z` over `s` sample images.

Fast path (`predictor_agop_from_grams`). For a convolutional kernel whose first layer only sees
patch inner products, `K(x_i, z)` depends on `z`'s patches only through
`gram[i, p] = p_p(x_i)^T M p_p(z)` and `sq[p] = p_p(z)^T M p_p(z)`. Replicate `sq` per training
image (`K_i` depends on its own copy only) and take ONE reverse pass of the scalar
`sum_i K(x_i, z)` w.r.t. `(gram, sq_replicated)`: that gives `A[i, p] = dK_i / d gram[i, p]` and
`B[i, p] = dK_i / d sq_i[p]` for all i at once. By the chain rule, for every class at once,

  `grad_{p_p(z)} f_c = M v_{c,p}`,
  `v_{c,p} = sum_i alpha_ic A[i, p] p_p(x_i) + 2 (sum_i alpha_ic B[i, p]) p_p(z)`,

so `G = M (sum_{z,c,p} v v^T) M / s`. The cost is one kernel-sized backward pass over the
(train x sample) pairs plus a contraction of `n * s * P * classes * d` multiply-adds; memory is
bounded by chunking over sample images and training images (`block_elements`).

A kernel object with a `grads_spatial_leading` method (the fused CNTK, `fused.GramConvKernel`)
supplies `A` and `B` from its own hand-written reverse pass instead of autodiff; blocks are then
laid out (positions, samples, train) so that the contraction is one batched matmul per position.
When the samples are all the training images (the ConvRFM default), pairs `(x_i, x_j)` and
`(x_j, x_i)` share Grams and reverse pass, so each unordered pair is evaluated once and both
directions are contracted from it (`symmetric=True`).

On a CPU, float32 AGOPs of such a kernel with a native path (`native_agop_rows`, the fused
CNTK's C++ custom call, `kernels/native.py`) run the reverse pass of each (sample, 16 training
images) pair block and its contraction with the training patches in cache, in one call per
chunk of samples: no pair-sized array is ever written. It evaluates every ordered pair (twice
the reverse passes of the symmetric XLA path) and is still 1.5-1.6x faster than it on a 2-core
Xeon (see WORKSPACE.md); float64, accelerators and several devices per process keep the
XLA paths.

Every path spreads its work over devices, and over the processes of a multi-host run: each
process computes its share of the blocks and the sums are added over processes
(`processes.DeviceAccumulators`).

Past `FEATURE_MIN_DIM` (patch dimension 64; Deep ConvRFM layers on many feature maps) such a
kernel's AGOP works on patch features `t = F^T p` with `F F^T = M`
(`fused.metric_factor_reduced`, `r` columns, `M`'s numerical rank): their inner products are
the patch Grams, and `M v = F w` with `w` the same sum over features, so
`G = F (sum w w^T) F^T / s`. The contraction takes the (sample, class) pairs as rows, so
no class-weighted copy of the training patches (`classes` times their memory) is formed and
only the training features are held, positions leading: on 160 images of 30 x 30 x 64
feature maps a Deep ConvRFM run's peak memory went from 12.2 to 3.2 GB (2-core Xeon,
2026-11-29). Every cost of this path scales with `r`, and learned metrics are far from full
rank (see `metric_factor_reduced`).

Generic path (`predictor_agop_autodiff`): any kernel defined on explicit patch tensors (for
example a neural-tangents stax kernel fed with expanded patch images), differentiated with
`jax.jacrev` (all classes in one vectorised reverse pass), chunked in the same way. It is also
the simple reference that the tests hold the fast path to.

NaN gradients (e.g. a kernel whose derivative is singular at a zero patch) raise a `ValueError`;
they are never zeroed.

References:
  D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
  convolutional neural networks. arXiv:2309.00570, 2023 (ConvRFM, Algorithm 1, and the
  patch AGOP of Section 2).
"""

import dataclasses
import functools
from typing import Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from jconvrfm._src import checks
from jconvrfm._src import patches as patches_lib
from jconvrfm._src import processes
from jconvrfm._src import tiling
from jconvrfm._src.kernels import fused
from jconvrfm._src.kernels import native as native_lib

# (gram12 (n1, n2, H', W'), sq1 (n1, H', W'), sq2 (n2, H', W')) -> (n1, n2)
GramKernelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
# (patches1 (n1, H', W', d), patches2 (n2, H', W', d)) -> (n1, n2), patches already transformed
PatchKernelFn = Callable[[jax.Array, jax.Array], jax.Array]

DEFAULT_BLOCK_ELEMENTS = 2**22


def _check_inputs(x_train, alpha, z, patch_size, padding, metric):
  x_train = checks.check_nhwc(x_train, 'x_train')
  z = checks.check_nhwc(z, 'z')
  alpha = checks.check_array(alpha, 'alpha', 2, layout='(n_train, classes)')
  if alpha.shape[0] != x_train.shape[0]:
    raise ValueError(
        f'`alpha` must have one row per training image ({x_train.shape[0]}), '
        f'got shape {tuple(alpha.shape)}.')
  if z.shape[1:] != x_train.shape[1:]:
    raise ValueError(
        f'`z` images must have the shape of the training images {tuple(x_train.shape[1:])}, '
        f'got {tuple(z.shape[1:])}.')
  q = checks.check_positive_int(patch_size, 'patch_size')
  padding = checks.canonical_padding(padding)
  d = q * q * x_train.shape[-1]
  dtype = x_train.dtype
  if metric is None:
    metric = jnp.eye(d, dtype=dtype)
  else:
    metric = checks.check_symmetric_psd(metric, 'metric', d).astype(dtype)
  return x_train, alpha.astype(dtype), z.astype(dtype), q, padding, metric


def _check_result(g, what):
  if not bool(jnp.all(jnp.isfinite(g))):
    raise ValueError(
        f'The {what} produced NaN or Inf gradients; the kernel is not differentiable at some '
        'patch (e.g. a norm at a zero patch). Gradients are never zeroed silently: fix the '
        'kernel (or its inputs) instead.')
  return g


def _block_sizes(n_train, n_z, positions, block_elements, train_block, z_block):
  # The kernel's inner loops vectorise over the sample axis (minor in the vmapped layout), so
  # prefer many sample images and few training images per block.
  if z_block is None:
    z_block = min(n_z, 256)
  z_block = min(checks.check_positive_int(z_block, 'z_block'), n_z)
  if train_block is None:
    train_block = max(1, block_elements // max(1, z_block * positions))
  train_block = min(checks.check_positive_int(train_block, 'train_block'), n_train)
  return train_block, z_block


def _hand_block_sizes(n_train, n_z, positions, block_elements, train_block, z_block):
  # The hand-written path contracts over the training images of a block in one matmul per
  # position: prefer many training images per block (the matmul's inner dimension).
  if train_block is None:
    train_block = min(n_train, 512)
  train_block = min(checks.check_positive_int(train_block, 'train_block'), n_train)
  if z_block is None:
    # This path holds two block-sized buffers where autodiff holds tens of arrays, so blocks
    # 8x larger stay within the same memory bound (and feed the matmul better).
    z_block = max(1, 8 * block_elements // max(1, train_block * positions))
  z_block = min(checks.check_positive_int(z_block, 'z_block'), n_z)
  return train_block, z_block


def _z_from_indices(x_train, z, z_indices):
  """Returns `(z, indices or None)`; exactly one of `z`, `z_indices` must be given."""
  if (z is None) == (z_indices is None):
    raise ValueError('Give exactly one of `z` (sample images) and `z_indices` (indices of '
                     'sample images in `x_train`).')
  if z_indices is None:
    return z, None
  idx = np.asarray(z_indices)
  if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
    raise ValueError(f'`z_indices` must be a non-empty 1-D integer array, got {idx!r}.')
  n = np.shape(x_train)[0]
  if idx.min() < 0 or idx.max() >= n:
    raise ValueError(f'`z_indices` must lie in [0, {n}), got range [{idx.min()}, {idx.max()}].')
  return jnp.asarray(x_train)[idx], idx


# ----------------------------------------------------------------------------------------------
# Fast path: structure of kernels that see patches only through Gram entries.
# ----------------------------------------------------------------------------------------------


# Pairs times positions per tile of the reverse pass. The backward of the kernel recursion holds
# a few tens of intermediates per pair and position; at about 2^18 elements (1 MiB each in
# float32) they stay near the CPU's caches. Measured on a 2-core CPU (42 x 42 images, depth 3),
# tiled reverse passes ran 1.7x faster than one whole-block pass streamed through memory.
_GRAD_TILE_ELEMENTS = 1 << 18


def _grad_tile_rows(m: int, b: int, positions: int) -> int:
  """Training images per reverse-pass tile: the largest divisor of `m` within the budget.

  A tile takes all `b` samples (the vectorised axis) of its training images, so tiles are
  contiguous slices of the `(m, b, H', W')` block: no padding and no transposes.
  """
  rows = max(_GRAD_TILE_ELEMENTS // max(b * positions, 1), 1)
  return max(t for t in range(1, min(rows, m) + 1) if m % t == 0)


def _pad_axis0(a: jax.Array, size: int) -> jax.Array:
  extra = size - a.shape[0]
  if extra == 0:
    return a
  return jnp.concatenate([a, jnp.zeros((extra,) + a.shape[1:], a.dtype)], axis=0)


def _gram_grads(kernel_from_grams: GramKernelFn, gram: jax.Array, sqx: jax.Array,
                sqz: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """`A = dK_i / d gram[i, b]` and `B = dK_i / d sq_i(z_b)`, `(m, b, H', W')` each, in tiles.

  Kernel entries of different pairs do not interact, so the gradient of the sum over one tile
  of pairs is that tile of the whole gradient.
  """
  m, b, h, w = gram.shape
  tm = _grad_tile_rows(m, b, h * w)

  def tile(args):
    g, s1 = args                                           # (tm, b, H, W), (tm, H, W)
    s2_rep = jnp.broadcast_to(sqz, g.shape)                # one copy of sq(z) per train image

    def total(g, s2_rep):
      def one_train_image(g_i, s1_i, s2_i):                # (b,H,W), (H,W), (b,H,W) -> (b,)
        return kernel_from_grams(g_i[None], s1_i[None], s2_i)[0]
      return jnp.sum(jax.vmap(one_train_image)(g, s1, s2_rep))

    return jax.grad(total, argnums=(0, 1))(g, s2_rep)

  a_t, b_t = jax.lax.map(tile, (gram.reshape(m // tm, tm, b, h, w),
                                sqx.reshape(m // tm, tm, h, w)))
  return a_t.reshape(gram.shape), b_t.reshape(gram.shape)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(8, 9))
def _v_from_grams(kernel_from_grams: GramKernelFn, px: jax.Array, mpx: jax.Array,
                  sqx: jax.Array, alpha: jax.Array, pz: jax.Array, sqz: jax.Array,
                  same: jax.Array, u_acc: jax.Array,
                  coef_acc: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Adds one training chunk's contribution to `v` (H', W', b, classes, d) of a sample block.

  `v = u + 2 coef p(z)` is kept as its two sums over training images, `u` (H', W',
  classes * d, b) and `coef` (H', W', b, classes), updated in place (donated buffers); `v` is
  formed once per sample block by `_masked_outer_sum`. (`u` keeps the samples minor: XLA's CPU
  batched matmul writes that layout about twice as fast as the transposed one.)

  Args:
    kernel_from_grams: the kernel as a function of Gram entries.
    px: `(m, H', W', d)` untransformed training patches; `mpx = px @ M`; `sqx` `(m, H', W')`.
    alpha: `(m, classes)`.
    pz: `(b, H', W', d)` untransformed sample patches, `sqz` `(b, H', W')` their squared
      M-norms (computed like `sqx`).
    same: `(m, b)` bool, True where sample b IS training image i: there the Gram entries are
      set to exactly `sqx` (cos = 1 exactly), so that the kernel's derivative convention at
      coinciding inputs applies instead of a rounding-dependent value of its singular
      derivative.
    u_acc: running `sum_i alpha_ic A[i, p] p_p(x_i)`.
    coef_acc: running `sum_i alpha_ic B[i, p]`.

  Returns:
    The updated `(u_acc, coef_acc)`.
  """
  gram = jnp.einsum('mhwd,bhwd->mbhw', mpx, pz)            # (m, b, H', W')
  gram = jnp.where(same[:, :, None, None], sqx[:, None], gram)
  a, b = _gram_grads(kernel_from_grams, gram, sqx, sqz)    # (m, b, H', W') each
  # sum_i alpha_ic A[i, p] p_p(x_i): one matmul per position over the train axis (positions
  # leading, which XLA's CPU batched dot handles far better than positions trailing).
  u = jnp.einsum('hwmb,hwmk->hwkb', jnp.transpose(a, (2, 3, 0, 1)),
                 _weighted_patches(px, alpha))
  coef = jnp.einsum('mbhw,mc->hwbc', b, alpha)
  return u_acc + u, coef_acc + coef


# Pairs times positions per tile of the hand-written reverse pass (its intermediates are about
# 20 arrays of this size). With the rematerialising pass, 2^19 float32 elements (one sample
# against a 200-image block of 40 x 40 maps) ran 5-10% faster than 2^20 on a 2-core CPU.
_HAND_TILE_ELEMENTS = 1 << 19
# Block sides of the symmetric path (block pairs I <= J) by default: smaller blocks skip more
# of the redundant half but shrink the contraction matmuls; at most `_SYMMETRIC_BLOCK_MAX`
# (the two reverse-pass buffers hold 2 * block^2 * H' W' numbers, 0.6 GB at 40 x 40 maps).
_SYMMETRIC_BLOCK_MIN = 128
_SYMMETRIC_BLOCK_MAX = 224
# The reverse pass vectorises over the training images of a block (the minor axis): a side
# that is a multiple of 16 float32 lanes (one AVX-512 register) leaves no masked remainder
# loop. An 800-image AGOP (42 x 42, depth 3, 2-core Xeon) took 13.5-13.9 s with blocks of 160
# against 14.5-14.9 s with blocks of 200; 832 images 14.9 s with 208 against 15.6-16.8 s with 167.
_SYMMETRIC_BLOCK_ALIGN = 16


def _symmetric_block(n: int) -> int:
  """Default block side of the symmetric path for `n` images.

  Among block counts `nb` whose sides `b = ceil(n / nb)`, rounded up to a multiple of 16,
  lie in [128, 224], the one with the least padded work `(0.6 nb + nb (nb - 1) / 2) b^2`
  (diagonal blocks cost about 0.6 of a block pair; ties: fewer blocks). `n` itself when
  `n <= 128`.
  """
  if n <= _SYMMETRIC_BLOCK_MIN:
    return n
  best = None
  for nb in range(-(-n // _SYMMETRIC_BLOCK_MAX), -(-n // _SYMMETRIC_BLOCK_MIN) + 1):
    b = -(-n // nb)
    b = -(-b // _SYMMETRIC_BLOCK_ALIGN) * _SYMMETRIC_BLOCK_ALIGN
    if not _SYMMETRIC_BLOCK_MIN <= b <= _SYMMETRIC_BLOCK_MAX:
      continue
    nb = -(-n // b)
    work = (_DIAGONAL_COST * nb + nb * (nb - 1) / 2) * b * b
    if best is None or work < best[0]:
      best = (work, b)
  return best[1] if best is not None else tiling.balanced_block(n, _SYMMETRIC_BLOCK_MAX)
# The symmetric path keeps `v`'s parts for all samples; above this many numbers (1 GiB in
# float32) the one-directional path, which keeps one sample block at a time, is used.
_SYMMETRIC_MAX_ELEMENTS = 1 << 28


def _hand_tile_cols(b: int, m: int, positions: int) -> int:
  """Sample images per tile of `_v_hand_written`: the largest divisor of `b` within budget."""
  cols = max(_HAND_TILE_ELEMENTS // max(m * positions, 1), 1)
  return max(t for t in range(1, min(cols, b) + 1) if b % t == 0)


def _weighted_patches(px: jax.Array, alpha: jax.Array) -> jax.Array:
  """`alpha_ic px[i, h, w, e]` as `(H', W', n, classes * d)`: positions lead (batched matmuls)."""
  n, h, w, d = px.shape
  weighted = (alpha[:, None, None, :, None] * px[:, :, :, None, :]).reshape(
      n, h, w, alpha.shape[1] * d)
  return jnp.transpose(weighted, (1, 2, 0, 3))


def _hand_written_grads(kernel, tile_cols: int, pz: jax.Array, sqz: jax.Array, mpx: jax.Array,
                        sqx: jax.Array, alpha: jax.Array, coef: jax.Array,
                        same: Optional[jax.Array], scratch: Tuple[jax.Array, ...]):
  """Reverse pass of `K(z_b, x_i)` over all (sample, train) pairs, in sample tiles.

  The (symmetric) kernel is evaluated with the samples as its first argument and the training
  images as its second, so that the gradients come out as `(H', W', samples, train)`: the
  contraction over training images is then one batched matmul per position with the whole
  training block as its inner dimension, with no transposes of pair-sized arrays (on a 2-core
  CPU about 5x the throughput of contracting tile by tile). Tiles of `tile_cols` samples go
  through the reverse pass in a `fori_loop` and are written in place into block-sized buffers.

  Args:
    kernel: has `grads_spatial_leading` (e.g. `fused.GramConvKernel`).
    tile_cols: samples per tile (divides `b`).
    pz: `(b, H', W', d)` untransformed sample patches, `sqz` `(b, H', W')` their squared
      M-norms.
    mpx: `(m, H', W', d)` training patches times `M`; `sqx` `(m, H', W')`.
    alpha: `(m, classes)` coefficients of the training images.
    coef: `(H', W', b, classes)` running `sum_i alpha_ic B_z[i]` of the samples, to which each
      tile adds its own (contracted in the tile: one plain matmul over the training images,
      which saves writing `B_z` to a block-sized buffer).
    same: None, or `(m, b)` bool, True where sample b IS training image i: there the Gram
      entry is set to exactly the squared norm (see `_v_from_grams`).
    scratch: one `(H', W', b, m)` buffer, or two to also get the training images' self-Gram
      gradients (`B_x`); overwritten entirely. Passing
      the previous call's results (donated) lets XLA write into memory it already holds, where
      fresh block-sized buffers cost a page fault per 4 KiB (about 2 M faults, a third of
      the system time, per 800-image AGOP on a 2-core CPU).

  Returns:
    `A = dK/dgram` `(H', W', b, m)`, the updated `coef`, and `B_x = dK/dsq(x)` (same shape as
    `A`) if `scratch` has two buffers.
  """
  return _hand_written_grads_pm(
      kernel, tile_cols, jnp.transpose(pz, (1, 2, 0, 3)), jnp.transpose(sqz, (1, 2, 0)),
      jnp.transpose(mpx, (1, 2, 3, 0)), jnp.transpose(sqx, (1, 2, 0)), alpha, coef,
      same, scratch, train_minor=False)


def _hand_written_grads_pm(kernel, tile_cols: int, pz_t: jax.Array, sqz_t: jax.Array,
                           mpx_t: jax.Array, sqx_t: jax.Array, alpha: jax.Array,
                           coef: jax.Array, same: Optional[jax.Array],
                           scratch: Tuple[jax.Array, ...], train_minor: bool):
  """`_hand_written_grads` on position-major operands.

  `pz_t` `(H', W', b, d)`, `sqz_t` `(H', W', b)`, `sqx_t` `(H', W', m)`, and `mpx_t`
  `(H', W', d, m)`, or `(H', W', m, d)` with `train_minor` (the features path's layout, which
  also feeds its contraction untransposed).
  """
  b = pz_t.shape[2]
  same_t = None if same is None else same.T                # (b, m)
  if train_minor:
    # All the block's Grams at once, before the loop: per sample (tiles of one sample are
    # usual here) they would be matrix-vector products, each reading all the training
    # features. For 29 samples x 320 training images at d = 576 on a 2-core Xeon the reverse
    # pass took 0.87 s with per-sample Grams and 0.34 s with these (the `(m, b)` layout ran
    # at 47 GFLOP/s, `(b, m)` at 31).
    grams = jnp.einsum('hwmd,hwbd->hwmb', mpx_t, pz_t)

  def body(t, bufs):
    start = t * tile_cols
    sqz_s = jax.lax.dynamic_slice_in_dim(sqz_t, start, tile_cols, axis=2)
    if train_minor:
      gram = jnp.swapaxes(jax.lax.dynamic_slice_in_dim(grams, start, tile_cols, axis=3), 2, 3)
    else:
      pz_s = jax.lax.dynamic_slice_in_dim(pz_t, start, tile_cols, axis=2)
      gram = jnp.matmul(pz_s, mpx_t)                       # (H, W, bt, m)
    if same_t is not None:
      same_s = jax.lax.dynamic_slice_in_dim(same_t, start, tile_cols, axis=0)
      gram = jnp.where(same_s, sqz_s[..., None], gram)
    _, a, bz, bx = kernel.grads_spatial_leading(gram, sqz_s, sqx_t)
    coef_s = jax.lax.dynamic_slice_in_dim(bufs[1], start, tile_cols, axis=2)
    new = (a, coef_s + jnp.matmul(bz, alpha), bx)
    return tuple(jax.lax.dynamic_update_slice_in_dim(buf, x, start, axis=2)
                 for buf, x in zip(bufs, new))

  return jax.lax.fori_loop(0, b // tile_cols, body, (scratch[0], coef) + tuple(scratch[1:]))


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(9, 10, 11))
def _v_hand_written(kernel, tile_cols: int, px: jax.Array, mpx: jax.Array, sqx: jax.Array,
                    alpha: jax.Array, pz: jax.Array, sqz: jax.Array, same: jax.Array,
                    u_acc: jax.Array, coef_acc: jax.Array, scratch: Tuple[jax.Array, ...]):
  """`_v_from_grams` for a kernel with a hand-written gradient (`grads_spatial_leading`).

  Same arguments and results as `_v_from_grams`, plus a one-tuple of an `(H', W', b, m)`
  `scratch` buffer for the reverse pass (donated; returned for the next call, see
  `_hand_written_grads`).
  """
  buf_a, coef = _hand_written_grads(kernel, tile_cols, pz, sqz, mpx, sqx, alpha, coef_acc,
                                    same, scratch)
  # u[h, w, (c, e), b] = sum_i A[h, w, b, i] alpha_ic px[i, h, w, e]. Writing the result with
  # the samples minor ran 2x faster on a 2-core CPU than `matmul`'s (h, w, b, (c, e)).
  u = jnp.einsum('hwbm,hwmk->hwkb', buf_a, _weighted_patches(px, alpha))
  return u_acc + u, coef, (buf_a,)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(9, 10, 11, 12, 13))
def _symmetric_pair(kernel, tile_cols: int, px_i: jax.Array, mpx_i: jax.Array,
                    sqx_i: jax.Array, alpha_i: jax.Array, px_j: jax.Array, sqx_j: jax.Array,
                    alpha_j: jax.Array, u_i: jax.Array, coef_i: jax.Array, u_j: jax.Array,
                    coef_j: jax.Array, scratch: Tuple[jax.Array, ...]):
  """Both directions of one off-diagonal block pair `(I, J)` of training images.

  The training images are also the samples. One reverse pass over the pairs gives
  `A = dK/dgram` (shared by the two directions, the Gram being symmetric) and the self-Gram
  gradients of both sides, so block `J` gets its samples' contributions from training block
  `I`, and block `I` gets them from `J`. `scratch`: two block-sized buffers for the reverse
  pass (donated, returned for the next call; see `_hand_written_grads`).
  """
  buf_a, coef_j, buf_bx = _hand_written_grads(kernel, tile_cols, px_j, sqx_j, mpx_i, sqx_i,
                                              alpha_i, coef_j, None, scratch)
  u_j = u_j + jnp.einsum('hwbm,hwmk->hwkb', buf_a, _weighted_patches(px_i, alpha_i))
  u_i = u_i + jnp.einsum('hwba,hwbk->hwka', buf_a, _weighted_patches(px_j, alpha_j))
  coef_i = coef_i + jnp.einsum('hwba,bc->hwac', buf_bx, alpha_j)
  return u_i, coef_i, u_j, coef_j, (buf_a, buf_bx)


# Relative cost of a diagonal block (one direction, no training-side self-Gram gradients, one
# contraction) against an off-diagonal block pair, for balancing devices.
_DIAGONAL_COST = 0.6


def _symmetric_agop_sum(kernel, px, mpx, sqx, alpha, block: int, progress,
                        devices) -> jax.Array:
  """`sum_{z, c, p} v v^T` over ALL training images as samples, each pair evaluated once.

  Pairs `(x_i, x_j)` and `(x_j, x_i)` share their Grams and (the kernel being symmetric)
  their reverse pass, so only block pairs `I <= J` are computed: about half the kernel work
  of the one-directional path. Holds `v`'s two parts for all samples (`n * H' * W' *
  classes * (d + 1)` numbers) on every device that works on them. Block pairs are spread
  over `devices` (`processes.DeviceAccumulators`). With devices of several processes, each
  block's two parts are summed over the processes (all-reduces of `n * H' * W' * classes * (d + 1)`
  numbers in all: 0.5 GB for 800 images of 42 x 42, 10 classes, d = 9), and every process
  forms the outer sums itself.
  """
  n, h, w, d = px.shape
  classes = alpha.shape[1]
  block = _symmetric_block(n) if block is None else tiling.balanced_block(n, block)
  n_pad = -(-n // block) * block
  px, mpx, sqx, alpha = (_pad_axis0(a, n_pad) for a in (px, mpx, sqx, alpha))
  nb = n_pad // block
  sl = [slice(k * block, (k + 1) * block) for k in range(nb)]
  tile_cols = _hand_tile_cols(block, block, h * w)
  pairs = [(i, j) for j in range(nb) for i in range(j + 1)]
  reported = 0
  eye = np.eye(block, dtype=bool)
  work = processes.DeviceAccumulators(devices)

  def inputs(dev, k):
    return work.put(dev, k, lambda: (px[sl[k]], mpx[sl[k]], sqx[sl[k]], alpha[sl[k]]))

  def accumulators(dev, k):
    if k not in work.acc[dev]:
      zeros = functools.partial(jnp.zeros, dtype=px.dtype, device=work.devices[dev])
      work.acc[dev][k] = (zeros((h, w, classes * d, block)), zeros((h, w, block, classes)))
    return work.acc[dev][k]

  def scratch(dev):
    if work.scratch[dev] is None:
      # Reverse-pass buffers, allocated once per device and handed from call to call (see
      # _hand_written_grads).
      work.scratch[dev] = tuple(
          jnp.zeros((h, w, block, block), px.dtype, device=work.devices[dev]) for _ in range(2))
    return work.scratch[dev]

  for k, (i, j) in enumerate(pairs):
    dev = work.assign(_DIAGONAL_COST if i == j else 1.0)
    if not work.local(dev):
      pass   # Another process's block pair.
    elif i == j:
      # A diagonal block is the one-directional case with its own images as samples.
      p_j, mp_j, sq_j, al_j = inputs(dev, j)
      u_j, coef_j = accumulators(dev, j)
      u_j, coef_j, one = _v_hand_written(
          kernel, tile_cols, p_j, mp_j, sq_j, al_j, p_j, sq_j,
          work.put(dev, 'eye', lambda: eye), u_j, coef_j, scratch(dev)[:1])
      work.acc[dev][j] = (u_j, coef_j)
      work.scratch[dev] = one + work.scratch[dev][1:]
    else:
      p_i, mp_i, sq_i, al_i = inputs(dev, i)
      p_j, _, sq_j, al_j = inputs(dev, j)
      u_i, coef_i = accumulators(dev, i)
      u_j, coef_j = accumulators(dev, j)
      u_i, coef_i, u_j, coef_j, work.scratch[dev] = _symmetric_pair(
          kernel, tile_cols, p_i, mp_i, sq_i, al_i, p_j, sq_j, al_j, u_i, coef_i, u_j, coef_j,
          scratch(dev))
      work.acc[dev][i] = (u_i, coef_i)
      work.acc[dev][j] = (u_j, coef_j)
    if progress is not None:
      done = (n * (k + 1)) // len(pairs)
      if done > reported:
        progress(done - reported)
        reported = done
  acc = jnp.zeros((d, d), px.dtype)
  for k in range(nb):
    u_k, coef_k = work.gather(k, lambda: (np.zeros((h, w, classes * d, block), px.dtype),
                                          np.zeros((h, w, block, classes), px.dtype)))
    valid = jnp.asarray(np.arange(k * block, (k + 1) * block) < n)
    acc = acc + _masked_outer_sum(u_k, coef_k, px[sl[k]], valid)
  return acc


@jax.jit
def _outer_sum(v):
  v = v.reshape(-1, v.shape[-1])
  return v.T @ v


@jax.jit
def _masked_outer_sum(u, coef, pz, valid):
  """`sum v v^T`, `v = u + 2 coef p(z)` (H', W', b, classes, d), over samples where `valid`.

  `u` is `(H', W', classes * d, b)`, `coef` `(H', W', b, classes)`, `pz` `(b, H', W', d)`.
  """
  h, w, b, classes = coef.shape
  v = (jnp.swapaxes(u, -1, -2).reshape(h, w, b, classes, -1) +
       2 * coef[..., None] * jnp.transpose(pz, (1, 2, 0, 3))[:, :, :, None, :])
  v = jnp.where(valid[None, None, :, None, None], v, jnp.zeros((), v.dtype))
  v = v.reshape(-1, v.shape[-1])
  return v.T @ v


# ----------------------------------------------------------------------------------------------
# Large patch dimensions: the AGOP in the space of the patch features `F^T p`.
# ----------------------------------------------------------------------------------------------

# Patch dimension above which a hand-written kernel's AGOP works on patch features (see
# `_feature_agop_sum`). The paths above keep `alpha`-weighted copies of the training patches,
# `classes` times the patches (29 GB for 1600 images of 30 x 30 x 64 feature maps).
FEATURE_MIN_DIM = 64
# Bound on the numbers in the features path's per-block arrays: the running `w` of a sample
# block (`H' W' b classes r`) and the weighted reverse-pass gradients (`H' W' b classes m`).
# Larger blocks feed the per-position contraction matmuls better: an AGOP over 400 images of
# 30 x 30 x 64 maps (d = 576, 10 classes) took 71 / 62 / 53 s at 2^26 / 2^27 / 2^28 elements,
# peak RSS 3.8 / 4.1 / 5.4 GB (2-core Xeon, 2026-11-29).
_FEATURE_BLOCK_ELEMENTS = 1 << 27


def _feature_block_sizes(n, s, positions, classes, r, train_block, z_block):
  if z_block is None:
    z_block = max(1, _FEATURE_BLOCK_ELEMENTS // max(1, positions * classes * r))
  z_block = min(checks.check_positive_int(z_block, 'z_block'), s)
  if train_block is None:
    # Bounds the class-weighted reverse-pass gradients (`H' W' b classes m`).
    train_block = max(16, _FEATURE_BLOCK_ELEMENTS // max(1, positions * classes * z_block))
  train_block = min(checks.check_positive_int(train_block, 'train_block'), n)
  return tiling.balanced_block(n, train_block), tiling.balanced_block(s, z_block)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(11, 12, 13))
def _w_block(kernel, tile_cols: int, tb: int, use_native: bool, t0: jax.Array, tx: jax.Array,
             sqx: jax.Array, alpha: jax.Array, tz: jax.Array, sqz: jax.Array, same: jax.Array,
             w_acc: jax.Array, coef_acc: jax.Array, scratch: Tuple[jax.Array, ...]):
  """Training images `t0 .. t0 + tb`'s contribution to a sample block's `w` (features path).

  `w[h, w, b, c] = sum_i alpha_ic A[h, w, b, i] tx[h, w, i]` `(H', W', b, classes, r)`, with
  `A = dK/dgram` from the reverse pass on the features (the Grams of features are the
  metric's patch Grams), and the running self-Gram coefficients `coef`. All operands are
  position-major (`tx` `(H', W', n, r)`, `sqx` `(H', W', n)`, `tz` `(H', W', b, r)`), so the
  Grams and the contraction read the training features as they are held, with no transposed
  copies. The contraction runs with the sample-class pairs as rows, so that no class-weighted
  copy of the training features is formed. `tx`, `sqx`, `alpha` are those of all training
  images (sliced here). `use_native`: on a CPU the contraction is the native
  `weighted_position_gemm`, which forms the class weighting per register tile and adds into
  `w_acc` in place (float32, `r` a multiple of 16).
  """
  tx_all, alpha_all = tx, alpha
  tx = jax.lax.dynamic_slice_in_dim(tx, t0, tb, axis=2)
  sqx = jax.lax.dynamic_slice_in_dim(sqx, t0, tb, axis=2)
  alpha = jax.lax.dynamic_slice_in_dim(alpha, t0, tb)
  buf_a, coef = _hand_written_grads_pm(kernel, tile_cols, tz, sqz, tx, sqx, alpha, coef_acc,
                                       same, scratch, train_minor=True)
  h, w, b, m = buf_a.shape

  def xla(buf_a, alpha, tx, w_acc):
    weights = jnp.einsum('hwbm,mc->hwbcm', buf_a, alpha).reshape(h * w, -1, m)
    w_new = _position_matmuls(weights, tx.reshape(h * w, m, -1))   # (H' W', b classes, r)
    return w_acc + w_new.reshape(w_acc.shape)

  if not use_native:
    return xla(buf_a, alpha, tx, w_acc), coef, (buf_a,)

  def cpu(buf_a, alpha, tx, w_acc):
    out = native_lib.weighted_position_gemm(
        buf_a.reshape(h * w, b, m), alpha_all, tx_all.reshape(h * w, tx_all.shape[2], -1), t0,
        w_acc.reshape(h * w, -1, w_acc.shape[-1]))
    return out.reshape(w_acc.shape)

  w_acc = jax.lax.platform_dependent(buf_a, alpha, tx, w_acc, cpu=cpu, default=xla)
  return w_acc, coef, (buf_a,)


def _position_matmuls(a: jax.Array, b: jax.Array) -> jax.Array:
  """`a[p] @ b[p]` for every position `p`, as a loop over groups of unbatched products.

  XLA's CPU batched dot ran these per-position products (`(290, 320) @ (320, 576)`, 784
  positions) at 84 GFLOP/s on a 2-core Xeon, where a loop over groups of four plain 2-D dots
  ran at 102 (2026-11-29). Other backends keep the batched dot (one batched GEMM on a GPU,
  where a loop of small ones would serialise).
  """
  p = a.shape[0]
  group = next(g for g in (4, 2, 1) if p % g == 0)

  def one(pair):
    x, y = pair
    return jnp.stack([x[j] @ y[j] for j in range(group)])

  def grouped(a, b):
    out = jax.lax.map(one, (a.reshape((p // group, group) + a.shape[1:]),
                            b.reshape((p // group, group) + b.shape[1:])))
    return out.reshape((p,) + out.shape[2:])

  return jax.lax.platform_dependent(a, b, cpu=grouped, default=jnp.matmul)


@jax.jit
def _masked_feature_outer_sum(w_acc, coef, tz, valid):
  """`sum W W^T`, `W = w + 2 coef tz` `(H', W', b, classes, r)`, over samples where `valid`."""
  v = w_acc + 2 * coef[..., None] * tz[:, :, :, None, :]
  v = jnp.where(valid[None, None, :, None, None], v, jnp.zeros((), v.dtype))
  v = v.reshape(-1, v.shape[-1])
  return v.T @ v


def _feature_agop_sum(kernel, x_train, alpha, z, idx, q, padding, metric, train_block,
                      z_block, progress, devices):
  """`F (sum_{z, c, p} w w^T) F^T` for a kernel with a hand-written reverse pass.

  With `F F^T = M` (`fused.metric_factor_reduced`, `(d, r)`; `F = I` for the identity) and
  features `t = F^T p`, the patch Grams are `t_x . t_z`, and the gradient of `f_c` w.r.t.
  `p(z)` at a position is `M v = F w` with `w = sum_i alpha_ic A_i t_i + 2 coef_c t_z`
  (`A = dK/dgram`, `coef` the self-Gram term), so the AGOP of `v` is `F (sum w w^T) F^T`.
  Only the training features (`n H' W' r` numbers, held position-major so that every block
  reads them untransposed) and per-block arrays bounded by `_FEATURE_BLOCK_ELEMENTS` are
  held; sample blocks go to `devices` as in the one-directional path. `z` (sample images) or
  `idx` (their indices among the training images). Returns the sum (not yet divided by the
  number of samples), `(d, d)`.
  """
  n, classes = alpha.shape
  h, w = patches_lib.output_shape(x_train.shape[1], x_train.shape[2], q, 1, padding)
  s = z.shape[0] if idx is None else idx.shape[0]
  factor = None if checks.is_identity(metric) else fused.metric_factor_reduced(metric)
  r = q * q * x_train.shape[-1] if factor is None else factor.shape[1]
  tb, zb = _feature_block_sizes(n, s, h * w, classes, r, train_block, z_block)
  n_pad, s_pad = -(-n // tb) * tb, -(-s // zb) * zb
  # Padded training images are zero images with alpha = 0 (finite gradients, no
  # contribution); padded samples are masked out of the sum.

  features = functools.partial(fused.metric_features_position_major, factor=factor, q=q,
                               padding=padding)
  tx, sqx = features(_pad_axis0(x_train, n_pad))           # (H', W', n, r), (H', W', n)
  alpha = _pad_axis0(alpha, n_pad)
  if idx is None:
    tz_all, sqz_all = features(_pad_axis0(z, s_pad))
    idx = np.full(s_pad, -1)
  else:
    tz_all = sqz_all = None
    idx = np.concatenate([idx, np.full(s_pad - s, -1)])

  def samples(z0):
    if tz_all is not None:
      return tz_all[:, :, z0:z0 + zb], sqz_all[:, :, z0:z0 + zb]
    # Samples among the training images: gathered per block (padded samples, masked out of
    # the sum, take image 0), so that their features are not held twice.
    rows = np.maximum(idx[z0:z0 + zb], 0)
    return tx[:, :, rows], sqx[:, :, rows]

  tile_cols = _hand_tile_cols(zb, tb, h * w)
  use_native = (tx.dtype == jnp.float32 and r % native_lib.LANES == 0 and
                native_lib.available())
  work = processes.DeviceAccumulators(devices)
  for z0 in range(0, s_pad, zb):
    dev = work.assign(1.0)
    if not work.local(dev):   # Another process's sample block.
      if progress is not None:
        progress(min(zb, s - z0))
      continue
    put = functools.partial(work.put, dev)
    tz, sqz = put(('z', z0), lambda: samples(z0))
    train = put('train', lambda: (tx, sqx, alpha))
    zidx = idx[z0:z0 + zb]
    zeros = functools.partial(jnp.zeros, dtype=tx.dtype, device=work.devices[dev])
    w_acc, coef = zeros((h, w, zb, classes, r)), zeros((h, w, zb, classes))  # donated below
    if work.scratch[dev] is None:
      work.scratch[dev] = (zeros((h, w, zb, tb)),)
    for t0 in range(0, n_pad, tb):
      same = jax.device_put(np.arange(t0, t0 + tb)[:, None] == zidx[None, :],
                            work.devices[dev])
      w_acc, coef, work.scratch[dev] = _w_block(
          kernel, tile_cols, tb, use_native, jnp.asarray(t0, jnp.int32), *train, tz, sqz,
          same, w_acc, coef, work.scratch[dev])
    valid = jax.device_put(np.arange(z0, z0 + zb) < s, work.devices[dev])
    part = _masked_feature_outer_sum(w_acc, coef, tz, valid)
    work.add(dev, 'acc', part)
    if progress is not None:
      progress(min(zb, s - z0))
  acc = work.gather('acc', lambda: jnp.zeros((r, r), tx.dtype))
  return acc if factor is None else factor @ acc @ factor.T


@jax.jit
def _metric_patches(p, metric):
  mp = p @ metric
  return mp, jnp.sum(mp * p, axis=-1)


def predictor_agop_from_grams(kernel_from_grams: GramKernelFn,
                              x_train: jax.Array,
                              alpha: jax.Array,
                              z: Optional[jax.Array] = None,
                              *,
                              z_indices: Optional[np.ndarray] = None,
                              patch_size: int,
                              padding: Union[str, checks.Padding] = 'VALID',
                              metric: Optional[jax.Array] = None,
                              train_block: Optional[int] = None,
                              z_block: Optional[int] = None,
                              block_elements: int = DEFAULT_BLOCK_ELEMENTS,
                              progress: Optional[Callable[[int], None]] = None,
                              symmetric: bool = True,
                              devices: Optional[Sequence[jax.Device]] = None,
                              native: Optional[bool] = None) -> jax.Array:
  """Patch AGOP of `f_c(z) = sum_i alpha_ic K(x_i, z)` for a Gram-based conv kernel, fast.

  Args:
    kernel_from_grams: `(gram12 (n1, n2, H', W'), sq1 (n1, H', W'), sq2 (n2, H', W')) ->
      (n1, n2)` with `gram12[a, b, i, j] = p_ij(x1_a)^T M p_ij(x2_b)` and `sq` the squared
      M-norms of the patches (e.g. `functools.partial(conv_kernel_from_grams, depth=...)`);
      must be differentiable (finite gradients at zero patches). Pass the same function object
      on every call to avoid recompiling (it is a static argument of a jitted function).
      A kernel normalisation (e.g. division by `max K_train`) belongs in `alpha`.
    x_train: `(n, H, W, C)` NHWC training images (the predictor's centres); its dtype is used.
    alpha: `(n, classes)` predictor coefficients.
    z: `(s, H, W, C)` sample images at which gradients are taken, or None with `z_indices`.
    z_indices: `(s,)` indices of the sample images in `x_train` (instead of `z`). Use this
      when sampling training images (the usual ConvRFM case): the pairs `(x_i, x_i)` then get
      Gram entries exactly equal to the squared norms, so a kernel with a kink at coinciding
      inputs (the ReLU NTK) uses its own derivative convention there, not a value of its
      singular derivative that depends on rounding.
    patch_size: q (stride-1 patches, `d = q*q*C` in Flax kernel order).
    padding: the kernel's padding (VALID, SAME or CIRCULAR).
    metric: `(d, d)` symmetric PSD patch metric `M` (identity if None).
    train_block: training images per chunk (default: `block_elements // (z_block * H' W')`).
    z_block: sample images per chunk (default min(s, 256)).
    block_elements: bound on `train_block * z_block * H' * W'`, the size of one Gram block
      (the backward pass holds a few tens of arrays this size).
    progress: optional callable called with the number of sample images finished per block.
    symmetric: when the samples are all training images (`z_indices` a permutation of
      `range(n)`) and the kernel has a hand-written reverse pass (`GramConvKernel`), evaluate
      each unordered pair of images once (about half the work; `train_block` then sets the
      block side, by default a multiple of 16 in [128, 224], see `_symmetric_block`). False
      forces the one-directional path (the tests compare the two). Not used past
      `FEATURE_MIN_DIM` (the features path evaluates every ordered pair).
    devices: devices to spread the blocks over (default: all local devices of an
      accelerator, or the first CPU device, whose simulated devices share the same cores;
      in a multi-process run the same for every process): block pairs (symmetric path) or
      sample blocks go to the least loaded device, each device keeps its own running sums,
      and these are added at the end. Each device compiles the block programs once. The
      result is the same up to float rounding for any number of devices (the summation order
      changes with it). Multi-host (after `jax.distributed.initialize()`): with devices of
      several processes (the default), every process must call this with the same arguments;
      each works only on its own devices' blocks, the sums are added over processes by
      all-reduces, and every process receives the same AGOP. A list of this process's
      devices only computes the whole AGOP in this process.
    native: the fused native CPU path (`kernel_from_grams.native_agop_rows`, see the module
      docstring): None uses it where it applies (float32, CPU default backend, one CPU
      device per process, the native library available), False never, True requires it (a
      `ValueError` says why it does not apply; also for patch dimensions over
      `native.MAX_PATCH_DIM`). Its chunks of samples are shared out among processes as the
      XLA paths' blocks are among devices; `symmetric` and the block sizes concern the XLA
      paths.

  Returns:
    `(d, d)` AGOP `(1/s) sum_{z, c, p} grad grad^T`, dtype of `x_train`.

  Raises:
    ValueError: bad shapes or a non-finite gradient.

  >>> import jax.numpy as jnp
  >>> def k(g, s1, s2):  # a linear kernel of the patches: K = sum_p p(x)^T M p(z)
  ...   return jnp.sum(g, axis=(2, 3))
  >>> x = jnp.ones((2, 4, 4, 1)); alpha = jnp.array([[1.], [1.]])
  >>> g = predictor_agop_from_grams(k, x, alpha, x, patch_size=3)
  >>> g.shape, float(g[0, 0])  # gradient 2 * ones(9) at each of 4 positions
  ((9, 9), 16.0)
  """
  z, idx = _z_from_indices(x_train, z, z_indices)
  x_train, alpha, z, q, padding, metric = _check_inputs(
      x_train, alpha, z, patch_size, padding, metric)
  d = q * q * x_train.shape[-1]
  if (d > FEATURE_MIN_DIM and hasattr(kernel_from_grams, 'grads_spatial_leading') and
      native is not True):
    acc = _feature_agop_sum(kernel_from_grams, x_train, alpha, None if idx is not None else z,
                            idx, q, padding, metric, train_block, z_block, progress,
                            processes.devices_or_default(devices))
    return _check_result(acc / z.shape[0], 'kernel predictor AGOP (features path)')
  px = patches_lib.patches(x_train, q, padding=padding)
  n, h, w, d = px.shape
  classes = alpha.shape[1]
  mpx, sqx = _metric_patches(px, metric)
  if idx is None:
    pz_all = patches_lib.patches(z, q, padding=padding)
    sqz_all = _metric_patches(pz_all, metric)[1]
    idx = np.full(pz_all.shape[0], -1)
  else:
    pz_all, sqz_all = px[idx], sqx[idx]   # bitwise the training values
  s = pz_all.shape[0]
  if _native_applies(kernel_from_grams, x_train.dtype, d, devices, native):
    mpz_all = mpx[idx] if z_indices is not None else _metric_patches(pz_all, metric)[0]
    acc = _native_agop_sum(kernel_from_grams, px, mpx, sqx, alpha, pz_all, mpz_all, sqz_all,
                           idx, progress, processes.devices_or_default(devices))
    return _check_result(metric @ acc @ metric / s, 'kernel predictor AGOP (native path)')
  # A kernel that brings its own reverse pass (the fused CNTK) skips autodiff.
  hand_written = hasattr(kernel_from_grams, 'grads_spatial_leading')
  if hand_written:
    tb, zb = _hand_block_sizes(n, s, h * w, block_elements, train_block, z_block)
  else:
    tb, zb = _block_sizes(n, s, h * w, block_elements, train_block, z_block)
  # Every block has the same shape (the last ones padded), so `_v_from_grams` compiles once.
  # Padded training images are zero images with alpha = 0 (finite gradients, no
  # contribution); padded samples are zero images whose `v` is masked out.
  tb, zb = tiling.balanced_block(n, tb), tiling.balanced_block(s, zb)
  n_pad, s_pad = -(-n // tb) * tb, -(-s // zb) * zb
  px, mpx, sqx, alpha = (_pad_axis0(a, n_pad) for a in (px, mpx, sqx, alpha))
  pz_all, sqz_all = _pad_axis0(pz_all, s_pad), _pad_axis0(sqz_all, s_pad)
  idx = np.concatenate([idx, np.full(s_pad - s, -1)])
  tile_cols = _hand_tile_cols(zb, tb, h * w)
  devices = processes.devices_or_default(devices)
  if (hand_written and symmetric and z_indices is not None and s == n and
      np.array_equal(np.sort(idx[:s]), np.arange(n)) and
      n * h * w * classes * (d + 1) <= _SYMMETRIC_MAX_ELEMENTS):
    acc = _symmetric_agop_sum(kernel_from_grams, px[:n], mpx[:n], sqx[:n], alpha[:n],
                              train_block, progress, devices)
    return _check_result(metric @ acc @ metric / s, 'kernel predictor AGOP (fused path)')
  # Sample blocks are independent: each goes to one device, which loops over the training
  # blocks and adds the block's `sum v v^T` to its own running sum.
  work = processes.DeviceAccumulators(devices)
  zero_acc = lambda: jnp.zeros((px.shape[-1],) * 2, x_train.dtype)
  for z0 in range(0, s_pad, zb):
    dev = work.assign(1.0)
    if not work.local(dev):   # Another process's sample block.
      if progress is not None:
        progress(min(zb, s - z0))
      continue
    put = functools.partial(work.put, dev)
    pz, sqz = put(('z', z0), lambda: (pz_all[z0:z0 + zb], sqz_all[z0:z0 + zb]))
    zidx = idx[z0:z0 + zb]
    zeros = functools.partial(jnp.zeros, dtype=x_train.dtype, device=work.devices[dev])
    u, coef = zeros((h, w, classes * d, zb)), zeros((h, w, zb, classes))  # donated below
    if hand_written and work.scratch[dev] is None:
      # Reverse-pass buffers, handed from call to call (_hand_written_grads).
      work.scratch[dev] = (zeros((h, w, zb, tb)),)
    for t0 in range(0, n_pad, tb):
      t1 = t0 + tb
      px_t, mpx_t, sqx_t, alpha_t = put(('train', t0), lambda: (px[t0:t1], mpx[t0:t1],
                                                                sqx[t0:t1], alpha[t0:t1]))
      same = jax.device_put(np.arange(t0, t1)[:, None] == zidx[None, :], work.devices[dev])
      if hand_written:
        u, coef, work.scratch[dev] = _v_hand_written(
            kernel_from_grams, tile_cols, px_t, mpx_t, sqx_t, alpha_t, pz, sqz, same, u, coef,
            work.scratch[dev])
      else:
        u, coef = _v_from_grams(kernel_from_grams, px_t, mpx_t, sqx_t, alpha_t, pz, sqz, same,
                                u, coef)
    valid = jax.device_put(np.arange(z0, z0 + zb) < s, work.devices[dev])
    part = _masked_outer_sum(u, coef, put(('z', z0), None)[0], valid)
    work.add(dev, 'acc', part)
    if progress is not None:
      progress(min(zb, s - z0))
  acc = work.gather('acc', zero_acc)
  g = metric @ acc @ metric / s
  return _check_result(g, 'kernel predictor AGOP (fused path)')


def _native_applies(kernel, dtype, patch_dim: int, devices, native: Optional[bool]) -> bool:
  """Whether `predictor_agop_from_grams` takes the native path (see its `native` argument)."""
  if native is not None and not isinstance(native, bool):
    raise TypeError(f'`native` must be None, True or False, got {native!r}.')
  if native is False:
    return False
  reasons = []
  if not hasattr(kernel, 'native_agop_rows'):
    reasons.append(f'the kernel {type(kernel).__name__} has no native path')
  if jnp.dtype(dtype) != jnp.float32:
    reasons.append(f'the dtype is {jnp.dtype(dtype)}, not float32')
  if patch_dim > native_lib.MAX_PATCH_DIM:
    reasons.append(f'the patch dimension {patch_dim} exceeds {native_lib.MAX_PATCH_DIM}')
  devices = processes.devices_or_default(devices)
  per_process = len(devices) == len({dv.process_index for dv in devices})
  if (not per_process or any(dv.platform != 'cpu' for dv in devices) or
      jax.default_backend() != 'cpu'):
    reasons.append('it runs on one CPU device (per process) only (the default backend must be '
                   'the CPU)')
  if not reasons and not native_lib.available():
    reasons.append(f'the native library is unavailable: {native_lib.unavailable_reason()}')
  if native and reasons:
    raise ValueError('native=True, but the native AGOP path does not apply: ' +
                     '; '.join(reasons) + '.')
  return not reasons


# Calls of the native path per AGOP (each reports progress when it finishes), shared out among
# processes in a multi-host run.
_NATIVE_CHUNKS = 8


@functools.partial(jax.jit, static_argnums=(0,))
def _native_rows(kernel, pz, mpz, sqz, zidx, blocks):
  return kernel.native_agop_rows(pz, mpz, sqz, zidx, blocks)


def _native_agop_sum(kernel, px, mpx, sqx, alpha, pz, mpz, sqz, idx, progress,
                     devices) -> jax.Array:
  """`sum_{z, c, p} v v^T` through the native custom call, in chunks of samples.

  Chunks have one size (the last padded with zero images whose rows are dropped), so the call
  compiles once; each returns its samples' `(d, d)` sums, added in sample order. `devices`:
  one CPU device per process; with several processes, the chunks are shared out among them
  and their sums added over processes.
  """
  s = pz.shape[0]
  work = processes.DeviceAccumulators(devices)
  blocks = jax.jit(native_lib.train_blocks)(px, sqx, alpha)
  chunk = -(-s // max(_NATIVE_CHUNKS, len(devices)))
  s_pad = -(-s // chunk) * chunk
  pz, mpz, sqz = (_pad_axis0(a, s_pad) for a in (pz, mpz, sqz))
  zidx = jnp.asarray(np.concatenate([idx[:s], np.full(s_pad - s, -1)]).astype(np.int32))
  for z0 in range(0, s_pad, chunk):
    z1 = min(z0 + chunk, s)
    dev = work.assign(1.0)
    if work.local(dev):
      rows = _native_rows(kernel, pz[z0:z0 + chunk], mpz[z0:z0 + chunk], sqz[z0:z0 + chunk],
                          zidx[z0:z0 + chunk], blocks)
      work.add(dev, 'acc', jnp.sum(rows[:z1 - z0], axis=0))
      if progress is not None:
        jax.block_until_ready(work.acc[dev]['acc'])
    if progress is not None:
      progress(z1 - z0)
  return work.gather('acc', lambda: np.zeros((px.shape[-1],) * 2, px.dtype))


# ----------------------------------------------------------------------------------------------
# Generic path: any kernel of explicit patch tensors, by autodiff.
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0,))
def _grads_autodiff(patch_kernel_fn: PatchKernelFn, spx: jax.Array, alpha: jax.Array,
                    pz: jax.Array, sqrt_metric: jax.Array) -> jax.Array:
  """`(b, classes, H', W', d)` gradients of one train chunk's predictor w.r.t. untransformed pz.

  The transform `p -> S p` is inside the differentiated function, so the chain rule's factor S
  is already applied.
  """

  def f(pz_one):                                          # (H', W', d) -> (classes,)
    k = patch_kernel_fn(spx, (pz_one @ sqrt_metric)[None])  # (m, 1)
    return alpha.T @ k[:, 0]

  return jax.vmap(jax.jacrev(f))(pz)


def predictor_agop_autodiff(patch_kernel_fn: PatchKernelFn,
                            x_train: jax.Array,
                            alpha: jax.Array,
                            z: Optional[jax.Array] = None,
                            *,
                            z_indices: Optional[np.ndarray] = None,
                            patch_size: int,
                            padding: Union[str, checks.Padding] = 'VALID',
                            metric: Optional[jax.Array] = None,
                            sqrt_metric: Optional[jax.Array] = None,
                            train_block: Optional[int] = None,
                            z_block: Optional[int] = None,
                            block_elements: int = DEFAULT_BLOCK_ELEMENTS,
                            progress: Optional[Callable[[int], None]] = None,
                            devices: Optional[Sequence[jax.Device]] = None) -> jax.Array:
  """Patch AGOP of `f_c(z) = sum_i alpha_ic K(S P(x_i), S P(z))` for any patch kernel.

  The kernel sees transformed patches `S p` (`S = M^(1/2)`, symmetric); gradients are w.r.t. the
  untransformed patches, `grad_p = S grad_{Sp}` (by differentiating through the transform).
  All classes are differentiated together with
  `jax.jacrev`.

  Args:
    patch_kernel_fn: `(patches1 (n1, H', W', d), patches2 (n2, H', W', d)) -> (n1, n2)`, a
      differentiable kernel of (transformed) patch tensors; pass the same function object on
      every call to avoid recompiling.
    x_train, alpha, z, z_indices, patch_size, padding, metric, train_block, z_block,
      block_elements, progress, devices: as in `predictor_agop_from_grams` (here `z_indices`
      only selects the images; no special treatment of coinciding inputs; sample blocks go
      to the devices).
    sqrt_metric: `(d, d)` symmetric `S` with `S^2 = M`; computed from `metric` by an
      eigendecomposition (negative eigenvalues clipped) if None.

  Returns:
    `(d, d)` AGOP, dtype of `x_train`.

  >>> import jax.numpy as jnp
  >>> def k(p1, p2):  # linear kernel of the patches
  ...   return jnp.einsum('ahwd,bhwd->ab', p1, p2)
  >>> x = jnp.ones((2, 4, 4, 1)); alpha = jnp.array([[1.], [1.]])
  >>> float(predictor_agop_autodiff(k, x, alpha, x, patch_size=3)[0, 0])
  16.0
  """
  z, _ = _z_from_indices(x_train, z, z_indices)
  x_train, alpha, z, q, padding, metric = _check_inputs(
      x_train, alpha, z, patch_size, padding, metric)
  if sqrt_metric is None:
    e, u = jnp.linalg.eigh(metric)
    sqrt_metric = (u * jnp.sqrt(jnp.clip(e, 0, None))) @ u.T
  else:
    sqrt_metric = checks.check_symmetric_psd(sqrt_metric, 'sqrt_metric',
                                             metric.shape[0]).astype(x_train.dtype)
  px = patches_lib.patches(x_train, q, padding=padding)
  pz_all = patches_lib.patches(z, q, padding=padding)
  n, h, w, _ = px.shape
  s = pz_all.shape[0]
  tb, zb = _block_sizes(n, s, h * w, block_elements, train_block, z_block)
  spx = px @ sqrt_metric
  work = processes.DeviceAccumulators(processes.devices_or_default(devices))
  for z0 in range(0, s, zb):
    dev = work.assign(1.0)
    if work.local(dev):
      put = functools.partial(work.put, dev)
      pz, root = put(('z', z0), lambda: pz_all[z0:z0 + zb]), put('root', lambda: sqrt_metric)
      grads = None
      for t0 in range(0, n, tb):
        spx_t, alpha_t = put(('train', t0), lambda: (spx[t0:t0 + tb], alpha[t0:t0 + tb]))
        part = _grads_autodiff(patch_kernel_fn, spx_t, alpha_t, pz, root)
        grads = part if grads is None else grads + part
      part = _outer_sum(grads)
      work.add(dev, 'acc', part)
    if progress is not None:
      progress(min(zb, s - z0))
  acc = work.gather('acc', lambda: np.zeros((px.shape[-1],) * 2, x_train.dtype))
  return _check_result(acc / s, 'kernel predictor AGOP (autodiff path)')


@dataclasses.dataclass(frozen=True)
class GramKernelOnPatches:
  """A Gram-based kernel as a kernel of explicit (transformed) patch tensors.

  `K(P1, P2) = kernel_from_grams(<P1, P2>, |P1|^2, |P2|^2)` with inner products per position
  (`P1` `(n1, H', W', d)`, `P2` `(n2, H', W', d)` -> `(n1, n2)`); feeding it to
  `predictor_agop_autodiff` gives the reference for the fast path. Hashable by the wrapped
  function, so jitted callers do not recompile for equal wrappers.
  """
  kernel_from_grams: GramKernelFn

  def __call__(self, p1: jax.Array, p2: jax.Array) -> jax.Array:
    gram = jnp.einsum('ahwd,bhwd->abhw', p1, p2)
    return self.kernel_from_grams(gram, jnp.sum(p1 * p1, -1), jnp.sum(p2 * p2, -1))
