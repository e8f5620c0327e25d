"""The fused CNTK kernel matrix as a native CPU custom call (XLA FFI), built on first use.

On the CPU, XLA compiles the fused recursion (`fused.py`) into a sequence of loops that each
stream a whole tile of position-major intermediates through memory. `cpu/fused_cntk.cc`
runs the whole recursion of one row image against 16 column images in buffers that stay in
the core's cache, vectorised over the 16 images (AVX-512 intrinsics where the compiler
targets them, otherwise portable vector code), with column blocks spread over the cores. It
computes the same float32 kernel as the XLA path, to float32 rounding.

The library is compiled from the source shipped in the package with the system C++ compiler
(`$CXX`, else `c++`, `g++` or `clang++`) the first time a float32 fused kernel is traced on a
CPU, and cached under `$JCONVRFM_CACHE_DIR` (default `~/.cache/jconvrfm`), keyed by the
source, the compiler, the flags, jaxlib's version and the CPU model and flags (`-march=native`
code must not run on another CPU). Without a compiler, or if the build fails, it logs why
once and the XLA path is used; `JCONVRFM_NATIVE=0` turns the native path off.
`JCONVRFM_NATIVE_THREADS` caps its threads (default: the cores this process may use).

Use `fused.fused_conv_kernel`, which routes float32 CPU calls here through
`jax.lax.platform_dependent` (so the same jitted function still lowers to the XLA path on a
GPU or TPU) and differentiates through the XLA path.

The same library holds the kernel's reverse pass w.r.t. the patch Grams
(`kernel_and_gram_grads`, tested, not routed) and the fused predictor AGOP
(`predictor_agop_rows`): per (sample, 16 training images) the reverse pass and its
contraction with the training patches and coefficients run in cache, and only each sample's
`d x d` sum leaves the call. `predictor_agop.predictor_agop_from_grams` routes float32 AGOPs
of `fused.GramConvKernel` on a single CPU device to it. Its feature-space path (patch
dimensions past 64) contracts through `weighted_position_gemm`, a register-tiled GEMM per
position with the class weighting formed per tile.

References:
  XLA custom calls and the typed FFI: https://openxla.org/xla/custom_call
  JAX foreign function interface: https://docs.jax.dev/en/latest/ffi.html
"""

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from jconvrfm._src import checks
from jconvrfm._src import patches as patches_lib

SOURCE = pathlib.Path(__file__).with_name('cpu') / 'fused_cntk.cc'
TARGET = 'jconvrfm_fused_cntk_f32'
SYMBOL = 'JconvrfmFusedCntkF32'
GRADS_TARGET = 'jconvrfm_fused_cntk_grads_f32'
GRADS_SYMBOL = 'JconvrfmFusedCntkGradsF32'
AGOP_TARGET = 'jconvrfm_fused_cntk_agop_f32'
AGOP_SYMBOL = 'JconvrfmFusedCntkAgopF32'
PIXELS_TARGET = 'jconvrfm_fused_cntk_pixels_f32'
PIXELS_SYMBOL = 'JconvrfmFusedCntkPixelsF32'
GEMM_TARGET = 'jconvrfm_weighted_position_gemm_f32'
GEMM_SYMBOL = 'JconvrfmWeightedPositionGemmF32'
LANES = 16  # column images per vector block (kLanes in the source)
# Largest patch dimension d = q^2 C sent to the patch-based custom calls. They form every
# image's patches (n x positions x d numbers per operand), so their memory grows with d, not
# with the number of kernel entries: the tiler's per-entry memory probe then sees 451 KB per
# entry at d = 1152 (32 x 32 probe, 30 x 30 x 128 maps; the XLA path 31 KB) and cuts a Deep
# ConvRFM final layer into 1891 tiles of 13+ minutes, where the XLA path took minutes. Up to
# this bound (the XLA path's own bound for precomputing patches) the measured cases run 2-5x
# the XLA path. Above it, kernels with the identity metric take the pixel call
# (`from_pixels`), whose operands are the images themselves, and whole kernel matrices with a
# learned metric take it on patch features (`kernel_from_feature_columns`, formed once per
# matrix by `fused.metric_kernel_matrix`).
MAX_PATCH_DIM = 64
# Row images and 16-column blocks per tile of the pixel call's per-pixel Grams (performance
# only; see WORKSPACE.md, "Native kernel from pixels").
PIXEL_ROW_TILE = 16
PIXEL_GROUP = 2
_PADDING_CODES = {checks.Padding.VALID: 0, checks.Padding.SAME: 1,
                  checks.Padding.CIRCULAR: 2}

_lock = threading.Lock()
_state = {'tried': False, 'ok': False, 'reason': 'not built yet', 'path': None}


def enabled() -> bool:
  """False when `JCONVRFM_NATIVE=0` (or `false`/`off`) turns the native path off."""
  return os.environ.get('JCONVRFM_NATIVE', '1').strip().lower() not in ('0', 'false', 'off',
                                                                       'no')


def threads() -> int:
  """Threads per call: `$JCONVRFM_NATIVE_THREADS`, else the cores this process may use."""
  value = os.environ.get('JCONVRFM_NATIVE_THREADS')
  if value:
    try:
      n = int(value)
    except ValueError as e:
      raise ValueError('JCONVRFM_NATIVE_THREADS must be a positive integer, got '
                       f'{value!r}.') from e
    if n < 1:
      raise ValueError(f'JCONVRFM_NATIVE_THREADS must be a positive integer, got {n}.')
    return n
  try:
    return max(len(os.sched_getaffinity(0)), 1)
  except AttributeError:  # not on Linux
    return max(os.cpu_count() or 1, 1)


def cache_dir() -> pathlib.Path:
  root = os.environ.get('JCONVRFM_CACHE_DIR')
  if root:
    return pathlib.Path(root)
  xdg = os.environ.get('XDG_CACHE_HOME')
  return (pathlib.Path(xdg) if xdg else pathlib.Path.home() / '.cache') / 'jconvrfm'


def _compiler() -> Optional[str]:
  cxx = os.environ.get('CXX')
  if cxx:
    return shutil.which(cxx) or cxx
  for name in ('c++', 'g++', 'clang++'):
    found = shutil.which(name)
    if found:
      return found
  return None


def _cpu_identity() -> str:
  """Model name and feature flags of this CPU (what `-march=native` compiles for)."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
      lines = f.read().splitlines()
    keep = [l for l in lines if l.split(':')[0].strip() in ('model name', 'flags', 'Features',
                                                            'CPU part')]
    return '\n'.join(sorted(set(keep)))
  except OSError:
    return platform.processor() + platform.machine()


def flag_sets() -> List[List[str]]:
  """Compiler flag sets tried in order (the first that builds is used)."""
  base = ['-std=c++17', '-O3', '-fPIC', '-shared', '-pthread', '-fno-math-errno',
          '-ffp-contract=fast', '-I', jax.ffi.include_dir()]
  sets = []
  if platform.machine().lower() in ('x86_64', 'amd64'):
    sets.append(base + ['-march=native', '-mprefer-vector-width=512'])
  sets.append(base + ['-march=native'])
  sets.append(base + ['-mcpu=native'])
  sets.append(base)
  return sets


def _compile(cxx: str, flags: Sequence[str], out: pathlib.Path) -> Optional[str]:
  """Builds the library into `out` atomically; returns an error text or None."""
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=out.parent)
  os.close(fd)
  try:
    proc = subprocess.run([cxx, *flags, str(SOURCE), '-o', tmp], capture_output=True,
                          text=True, check=False, timeout=300)
    if proc.returncode != 0:
      return (proc.stderr or proc.stdout).strip()[-2000:]
    os.replace(tmp, out)
    return None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _build() -> pathlib.Path:
  """The cached library for this source, compiler and CPU, compiled if missing."""
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError('no C++ compiler found ($CXX, c++, g++ or clang++)')
  try:
    version = subprocess.run([cxx, '--version'], capture_output=True, text=True, check=False,
                             timeout=60).stdout
  except (OSError, subprocess.SubprocessError) as e:
    raise RuntimeError(f'cannot run the C++ compiler {cxx}: {e}') from e
  errors = []
  for flags in flag_sets():
    key = hashlib.sha256('\0'.join([
        SOURCE.read_text(encoding='utf-8'), version, ' '.join(flags), jaxlib.__version__,
        _cpu_identity()]).encode()).hexdigest()[:20]
    path = cache_dir() / f'fused_cntk_{key}.so'
    if path.exists():
      return path
    error = _compile(cxx, flags, path)
    if error is None:
      return path
    errors.append(f'{" ".join(flags[:-2])}: {error}')
  raise RuntimeError('the native kernel did not compile:\n' + '\n'.join(errors))


def available() -> bool:
  """Whether the native CPU kernel is enabled, built and registered (builds it once)."""
  if not enabled():
    return False
  with _lock:
    if not _state['tried']:
      _state['tried'] = True
      try:
        path = _build()
        lib = ctypes.cdll.LoadLibrary(str(path))
        for target, symbol in ((TARGET, SYMBOL), (GRADS_TARGET, GRADS_SYMBOL),
                               (AGOP_TARGET, AGOP_SYMBOL), (PIXELS_TARGET, PIXELS_SYMBOL),
                               (GEMM_TARGET, GEMM_SYMBOL)):
          jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                      platform='cpu')
        _state.update(ok=True, reason=None, path=str(path))
      except Exception as e:  # pylint: disable=broad-except
        _state.update(ok=False, reason=str(e))
        logging.warning('jconvrfm: native CPU kernel unavailable, using the XLA path: %s', e)
    return _state['ok']


def unavailable_reason() -> Optional[str]:
  """Why `available()` is False (None when it is True or was not asked yet)."""
  if not enabled():
    return 'JCONVRFM_NATIVE turns the native path off'
  return _state['reason']


def library_path() -> Optional[str]:
  return _state['path']


def _require():
  if not available():
    raise RuntimeError(f'The native CPU kernel is unavailable: {unavailable_reason()}')


def supports(dtype) -> bool:
  """Whether calls of this dtype may take the native path (float32 only)."""
  return jnp.dtype(dtype) == jnp.float32


def from_pixels(metric: Optional[jax.Array], q: int, channels: int) -> bool:
  """Whether `kernel` computes from pixels: the identity metric past `MAX_PATCH_DIM`."""
  return metric is None and q * q * channels > MAX_PATCH_DIM


def _lane_blocks(a: jax.Array) -> jax.Array:
  """`(n, k, ...)` -> `(blocks, k, ..., 16)`: images in blocks of 16 lanes, zero-padded.

  Padded images are zero images: zero variances, finite (zero) kernel columns.
  """
  n = a.shape[0]
  blocks = -(-n // LANES)
  if blocks * LANES != n:
    a = jnp.pad(a, [(0, blocks * LANES - n)] + [(0, 0)] * (a.ndim - 1))
  a = a.reshape((blocks, LANES) + a.shape[1:])
  return jnp.moveaxis(a, 1, -1)


def _pixel_self_grams(x: jax.Array, q: int, padding: checks.Padding) -> jax.Array:
  """`(n, H', W')`: layer 1's self Grams for `M = I`, window sums of pixel squared norms."""
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return patches_lib._patches(sq, q, 1, padding).sum(axis=-1)  # pylint: disable=protected-access


@functools.partial(jax.jit, static_argnames=('q', 'padding'))
def _pixel_columns_sq(x2, q, padding):
  return _lane_blocks(_pixel_self_grams(x2, q, padding).reshape(x2.shape[0], -1))


@functools.partial(jax.jit, static_argnames=('q', 'padding'))
def _patch_columns(x2, metric, q, padding):
  n2 = x2.shape[0]
  p2 = patches_lib._patches(x2, q, 1, padding)  # pylint: disable=protected-access
  mp2 = p2 if metric is None else p2 @ metric
  sq2 = jnp.sum(p2 * mp2, axis=-1)
  return (_lane_blocks(mp2.reshape(n2, -1, mp2.shape[-1])),
          _lane_blocks(sq2.reshape(n2, -1)))


def columns(x2: jax.Array, metric: Optional[jax.Array], q: int, padding: checks.Padding):
  """The column images' operands of `kernel_from_columns`, in blocks of 16 lanes.

  `(M p, sq)` `(blocks, P, d, 16)`, `(blocks, P, 16)`, or with `from_pixels` the images
  themselves, unchanged and uncopied (the call lays them out block by block), and their self
  Grams `(blocks, P, 16)`. Computed once per kernel matrix (`fused.native_kernel_matrix`) and
  shared by its row chunks.
  """
  if from_pixels(metric, q, x2.shape[-1]):
    return x2, _pixel_columns_sq(x2, q, padding)
  return _patch_columns(x2, metric, q, padding)


def kernel_from_columns(x1: jax.Array, cols, metric: Optional[jax.Array], depth: int, q: int,
                        padding: checks.Padding, ntk: bool,
                        first_row: Optional[jax.Array] = None,
                        row_tile: int = PIXEL_ROW_TILE, group: int = PIXEL_GROUP) -> jax.Array:
  """Unchecked float32 kernel matrix `(n1, 16 blocks)` of rows `x1` against `columns(...)`.

  The row images' patches and self Grams are formed here in JAX; the custom call runs the
  recursion. With `from_pixels` (the identity metric past `MAX_PATCH_DIM`) layer 1's
  covariance at a position is the q x q window sum of per-pixel channel inner products (as the
  XLA path's `_grams_identity`), so the call reads the images themselves, not q^2-fold patch
  arrays; it computes the per-pixel Grams of `row_tile` row images against `group` column
  blocks at a time (performance only), then each pair block's window sum and recursion.
  `first_row` (an int32 scalar, may be traced): rows `x1` are images `first_row + a` of the
  columns (a symmetric matrix); then only 16-column blocks that reach a row's diagonal are
  computed, the others are zeros (about half the work; mirror the upper triangle). Requires
  `available()`; columns past the real images are zero (slice them off).
  """
  _require()
  if row_tile < 1 or group < 1:
    raise ValueError(f'kernel_from_columns: row_tile and group must be positive, got '
                     f'{row_tile} and {group}.')
  c = x1.shape[-1]
  if from_pixels(metric, q, c):
    return _pixel_call(x1, cols, q, q, depth, padding, ntk, c, first_row, row_tile, group)
  cols, sq2 = cols
  n1 = x1.shape[0]
  p1 = patches_lib._patches(x1, q, 1, padding)  # pylint: disable=protected-access
  _, h, w, d = p1.shape
  mp1 = p1 if metric is None else p1 @ metric
  sq1 = jnp.sum(p1 * mp1, axis=-1).reshape(n1, h * w)
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((n1, sq2.shape[0] * LANES), jnp.float32),
                          vmap_method='sequential')
  return call(p1.reshape(n1, h * w, d), sq1, cols, sq2, _first_row(first_row),
              height=np.int64(h), width=np.int64(w), q=np.int64(q), depth=np.int64(depth),
              padding=np.int64(_PADDING_CODES[padding]), inv_channels=np.float32(1.0 / c),
              ntk=bool(ntk), threads=np.int64(threads()))


def _first_row(first_row) -> jax.Array:
  return jnp.asarray(-1 if first_row is None else first_row, jnp.int32)


def _pixel_call(x1, cols, first_q, q, depth, padding, ntk, channels, first_row, row_tile,
                group):
  """The pixel call: layer 1 sums `first_q` x `first_q` windows of per-pixel Grams.

  `x1` `(n1, H, W, C)` and `cols = (x2, sq2)` as `columns` / `feature_columns` give them;
  `channels`: the images' channels (layer 1 divides by it).
  """
  cols, sq2 = cols
  n1, h, w, c = x1.shape
  sq1 = _pixel_self_grams(x1, first_q, padding).reshape(n1, -1)
  call = jax.ffi.ffi_call(PIXELS_TARGET,
                          jax.ShapeDtypeStruct((n1, sq2.shape[0] * LANES), jnp.float32),
                          vmap_method='sequential')
  return call(x1.reshape(n1, h * w, c), sq1, cols.reshape(cols.shape[0], h * w, c), sq2,
              _first_row(first_row), height=np.int64(h), width=np.int64(w), q=np.int64(q),
              depth=np.int64(depth), padding=np.int64(_PADDING_CODES[padding]),
              inv_channels=np.float32(1.0 / channels), ntk=bool(ntk),
              threads=np.int64(threads()), row_tile=np.int64(row_tile),
              group=np.int64(group), first_q=np.int64(first_q))


def feature_columns(t2: jax.Array):
  """The column operands of `kernel_from_feature_columns`: features and their squared norms.

  `t2` `(n2, H', W', r)` as it is (uncopied), and `(blocks, H' W', 16)` squared norms (the
  pixel call's self Grams with a 1 x 1 window, for which the padding does not matter).
  """
  return t2, _pixel_columns_sq(t2, 1, checks.Padding.VALID)


def kernel_from_feature_columns(t1: jax.Array, cols, depth: int, q: int,
                                padding: checks.Padding, ntk: bool, channels: int,
                                first_row: Optional[jax.Array] = None,
                                row_tile: int = PIXEL_ROW_TILE,
                                group: int = PIXEL_GROUP) -> jax.Array:
  """Unchecked float32 kernel `(n1, 16 blocks)` from per-position patch features.

  `t1` `(n1, H', W', r)` and `cols = feature_columns(t2)` hold features `F^T p` of every
  layer-1 position's patch, with `F F^T = M` (`fused.metric_factor`), so that layer 1's
  covariance is their inner product `p^T M p'`: the pixel call with a 1 x 1 first window on
  the `H' x W'` grid, then the recursion with q x q windows and `padding`. `channels`: the
  images' channels c (layer 1 divides by it). `first_row`, `row_tile`, `group` as in
  `kernel_from_columns`. Requires `available()`; columns past the real images are zero.
  """
  _require()
  if row_tile < 1 or group < 1:
    raise ValueError(f'kernel_from_feature_columns: row_tile and group must be positive, got '
                     f'{row_tile} and {group}.')
  return _pixel_call(t1, cols, 1, q, depth, padding, ntk, channels, first_row, row_tile, group)


def kernel(x1: jax.Array, x2: jax.Array, metric: Optional[jax.Array], depth: int, q: int,
           padding: checks.Padding, ntk: bool,
           first_row: Optional[jax.Array] = None, **tiles) -> jax.Array:
  """Unchecked float32 kernel matrix `(n1, n2)` through the custom call (CPU only).

  `columns(x2, ...)` then `kernel_from_columns` (see there; `tiles`: its `row_tile` and
  `group`). Requires `available()`.
  """
  out = kernel_from_columns(x1, columns(x2, metric, q, padding), metric, depth, q, padding,
                            ntk, first_row, **tiles)
  return out[:, :x2.shape[0]]


def kernel_and_gram_grads(g12: jax.Array, g1: jax.Array, g2: jax.Array, depth: int, q: int,
                          padding: checks.Padding, channels: int, ntk: bool):
  """`fused.kernel_and_gram_grads_internal` through the custom call (float32, CPU only).

  Spatial-leading layout: `g12` `(H', W', n1, n2)` with `n2` a multiple of 16, `g1`
  `(H', W', n1)`, `g2` `(H', W', n2)`. Returns `(K (n1, n2), dK/dg12, dK/dg1, dK/dg2)`, the
  last three `(H', W', n1, n2)` (self-Gram gradients per pair). Requires `available()`.
  """
  _require()
  h, w, n1, n2 = g12.shape
  if n2 % LANES:
    raise ValueError(f'kernel_and_gram_grads: n2 = {n2} must be a multiple of {LANES}.')
  pairs = jax.ShapeDtypeStruct((h, w, n1, n2), jnp.float32)
  call = jax.ffi.ffi_call(GRADS_TARGET,
                          (jax.ShapeDtypeStruct((n1, n2), jnp.float32), pairs, pairs, pairs),
                          vmap_method='sequential')
  return call(g12, g1, g2, q=np.int64(q), depth=np.int64(depth),
              padding=np.int64(_PADDING_CODES[padding]),
              inv_channels=np.float32(1.0 / channels), ntk=bool(ntk),
              threads=np.int64(threads()))


def weighted_position_gemm(a: jax.Array, alpha: jax.Array, t: jax.Array, t0: jax.Array,
                           c: jax.Array) -> jax.Array:
  """`c[p, b C + k] + sum_i a[p, b, i] alpha[t0 + i, k] t[p, t0 + i]`, float32, CPU only.

  The feature AGOP's contraction (`predictor_agop._w_block`) as one custom call: `a`
  `(P, B, I)`, `alpha` `(n, C)` and `t` `(P, n, N)` for all `n` training images (`N` a
  multiple of 16), `t0` the block's first image (int32 scalar), `c` `(P, B C, N)`, whose
  buffer the result reuses (donate it). The class-weighted `a * alpha` is formed per register
  tile and never as a whole array. Requires `available()`.
  """
  _require()
  call = jax.ffi.ffi_call(GEMM_TARGET, jax.ShapeDtypeStruct(c.shape, jnp.float32),
                          vmap_method='sequential', input_output_aliases={4: 0})
  return call(a, alpha, t, jnp.asarray(t0, jnp.int32).reshape(()), c,
              threads=np.int64(threads()))


# Column blocks whose reverse passes are contracted together (one lane reduction per group),
# and samples per tile sharing each group's training data. Measured on a 2-core Xeon (42 x 42,
# depth 3, 800 images): see WORKSPACE.md, "Native predictor AGOP".
AGOP_GROUP = 4
AGOP_ROW_TILE = 4


def train_blocks(px: jax.Array, sqx: jax.Array, alpha: jax.Array):
  """Training patches, squared norms and coefficients in the custom call's lane layout.

  `px` `(n, H', W', d)` untransformed patches, `sqx` `(n, H', W')`, `alpha` `(n, classes)`
  -> `(blocks, P, d, 16)`, `(blocks, P, 16)`, `(blocks, classes, 16)`; padded images are zero
  images with zero coefficients (zero variances: finite, and no contribution).
  """
  n, h, w, d = px.shape
  return (_lane_blocks(px.reshape(n, h * w, d)), _lane_blocks(sqx.reshape(n, h * w)),
          _lane_blocks(alpha))


def predictor_agop_rows(pz: jax.Array, mpz: jax.Array, sqz: jax.Array, zidx: jax.Array,
                        blocks, depth: int, q: int, padding: checks.Padding, channels: int,
                        ntk: bool, group: int = AGOP_GROUP,
                        row_tile: int = AGOP_ROW_TILE) -> jax.Array:
  """Per-sample `sum_{p, c} v v^T` of the predictor AGOP, fused (float32, CPU only).

  `v[p, c] = sum_i alpha_ic (A_i[p] x_i[p] + 2 B_i[p] z[p])` as in `predictor_agop.py`, with
  `A`, `B` the kernel's gradients w.r.t. the sample's Gram entries and squared norms; the
  reverse passes and the contractions run in one custom call, in cache.

  Args:
    pz: `(s, H', W', d)` untransformed sample patches; `mpz = pz @ M`; `sqz` `(s, H', W')`
      their squared M-norms (bitwise those of the training images for samples that are).
    zidx: `(s,)` int32 index of each sample among the training images, or -1: that pair's
      correlation is exactly 1 at every layer (the derivative conventions at coinciding
      inputs), and its Gram entry is `sqz`.
    blocks: `train_blocks(px, sqx, alpha)` of the training images.
    depth, q, padding, channels, ntk: the kernel (`fused.GramConvKernel`).
    group, row_tile: blocking of the loops (performance only).

  Returns:
    `(s, d, d)` float32. Requires `available()`.
  """
  if not 1 <= group <= 16:
    raise ValueError(f'predictor_agop_rows: group must lie in [1, 16], got {group}.')
  if row_tile < 1:
    raise ValueError(f'predictor_agop_rows: row_tile must be positive, got {row_tile}.')
  _require()
  px, sqx, alpha = blocks
  s, h, w, d = pz.shape
  call = jax.ffi.ffi_call(AGOP_TARGET, jax.ShapeDtypeStruct((s, d, d), jnp.float32),
                          vmap_method='sequential')
  return call(pz.reshape(s, h * w, d), mpz.reshape(s, h * w, d), sqz.reshape(s, h * w),
              zidx.astype(jnp.int32), px, sqx, alpha,
              height=np.int64(h), width=np.int64(w), q=np.int64(q), depth=np.int64(depth),
              padding=np.int64(_PADDING_CODES[padding]),
              inv_channels=np.float32(1.0 / channels), ntk=bool(ntk),
              threads=np.int64(threads()), group=np.int64(group),
              row_tile=np.int64(row_tile))
