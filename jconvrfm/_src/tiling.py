"""Tiled, sharded kernel matrices: `K[a, b] = kernel_fn(x1[a], x2[b])` built block by block.

A kernel matrix of `n1 x n2` entries is cut into fixed-shape `b1 x b2` tiles. The tiles are
handed out in rounds, one tile per device per round, through `jax.shard_map` over a
one-axis device mesh (`'tiles'`): every device runs the same compiled per-tile program, so the
result does not depend on the number of devices, bit for bit. Inputs whose size is not a
multiple of the block are padded (by repeating the last example, a valid input) and the
padding is cropped from the result, so every tile has the same shape and the program compiles
once. For a symmetric train-train matrix (`x2 is None`) only tiles on or above the block
diagonal are computed; the others are their transposes.
"""

import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jconvrfm._src import checks

KernelFn = Callable[[jax.Array, jax.Array], jax.Array]

# Budget for one tile's working memory when the device does not report its memory
# (CPU) and no `memory_budget_bytes` is given.
DEFAULT_CPU_BUDGET_BYTES = 512 * 2**20
# Fraction of an accelerator's memory (`bytes_limit`) used for one tile by default; two rounds
# of tiles are in flight at a time and the kernel's inputs also need room.
DEFAULT_DEVICE_FRACTION = 0.25
# Side of the probe block whose compiled memory is measured to estimate bytes per entry.
PROBE_BLOCK = 32
# Automatic tiles hold at most this many squared entries: bigger tiles rarely pay and, for a
# symmetric matrix, compute more redundant entries below the diagonal (measured on one H200,
# conv_ntk depth 3, q 3, n = 4000 images 42x42x1 float32: 0.85 s with 256 or 512 tiles,
# 0.93 s with 1024, 1.25 s with the 2 x 2 blocks that fill a quarter of the memory, 1.36 s
# unblocked).
DEFAULT_MAX_BLOCK = 512
# An automatic symmetric tiling has at least this many blocks per side (while blocks stay at
# least `_MIN_SYMMETRIC_BLOCK` wide): its diagonal tiles are computed whole, so with `nb`
# blocks about `1/nb` of the computed entries are redundant (33% for the 4 blocks of 258 that
# the CPU budget gave 1000 images, with padding; 8% with 16 blocks of 63).
SYMMETRIC_MIN_BLOCKS = 16
_MIN_SYMMETRIC_BLOCK = 64


class TilePlan(NamedTuple):
  """How a kernel matrix is cut into tiles.

  Attributes:
    block_shape: `(b1, b2)` rows and columns of every tile.
    grid_shape: `(nb1, nb2)` number of row and column blocks, `ceil(n / b)`.
    tiles: `(num_tiles, 2)` int array of (row block, column block) indices to compute, in order;
      for a symmetric matrix only those with row block <= column block.
    symmetric: whether the lower blocks are mirrored from the upper ones.
  """
  block_shape: Tuple[int, int]
  grid_shape: Tuple[int, int]
  tiles: np.ndarray
  symmetric: bool


def plan_tiles(n1: int, n2: int, block_shape: Tuple[int, int], symmetric: bool) -> TilePlan:
  """Lists the tiles of an `n1 x n2` matrix with `block_shape` blocks (upper ones if symmetric)."""
  b1, b2 = block_shape
  nb1, nb2 = -(-n1 // b1), -(-n2 // b2)
  if symmetric:
    tiles = [(i, j) for i in range(nb1) for j in range(i, nb2)]
  else:
    tiles = [(i, j) for i in range(nb1) for j in range(nb2)]
  return TilePlan((b1, b2), (nb1, nb2), np.array(tiles, dtype=np.int64).reshape(-1, 2),
                  symmetric)


def estimate_bytes_per_entry(kernel_fn: KernelFn, x1, x2, probe: int = PROBE_BLOCK,
                             kernel_args: Sequence[Any] = ()) -> float:
  """Working memory per kernel entry, from the compiled memory of one `probe x probe` block.

  Compiles `kernel_fn` for a `(p1, p2)` block (`p = min(probe, n)`) and divides its temporary
  plus output bytes (`Compiled.memory_analysis()`) by `p1 * p2`. Where the backend reports no
  memory analysis, falls back to `4 * itemsize * prod(x1.shape[1:])` (a few feature-sized
  maps per entry, the order of the fused CNTK's per-entry work).

  Args:
    kernel_fn: `kernel_fn(x1_block, x2_block) -> (b1, b2)`.
    x1: `(n1, ...)` array (only its shape and dtype are used).
    x2: `(n2, ...)` array (only its shape and dtype are used).
    probe: side of the probe block.
    kernel_args: extra arguments of `kernel_fn` after the two blocks (as in `kernel_matrix`).

  Returns:
    Estimated bytes per entry (float, at least the output itemsize).
  """
  p1, p2 = min(probe, x1.shape[0]), min(probe, x2.shape[0])
  a = jax.ShapeDtypeStruct((p1,) + tuple(x1.shape[1:]), x1.dtype)
  b = jax.ShapeDtypeStruct((p2,) + tuple(x2.shape[1:]), x2.dtype)
  extra = tuple(kernel_args)
  out = jax.eval_shape(kernel_fn, a, b, *extra)
  itemsize = np.dtype(out.dtype).itemsize
  try:
    stats = jax.jit(kernel_fn).lower(a, b, *extra).compile().memory_analysis()
    measured = (stats.temp_size_in_bytes + stats.output_size_in_bytes) / (p1 * p2)
  except Exception:  # pylint: disable=broad-except
    # No memory analysis on this backend (or kernel_fn cannot be jitted alone).
    measured = 4 * np.dtype(x1.dtype).itemsize * math.prod(x1.shape[1:])
  return float(max(measured, itemsize))


def _default_budget(devices) -> int:
  stats = None
  try:
    stats = devices[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    pass
  if stats and stats.get('bytes_limit'):
    return int(DEFAULT_DEVICE_FRACTION * stats['bytes_limit'])
  return DEFAULT_CPU_BUDGET_BYTES


def choose_block_shape(n1: int, n2: int, *, budget_bytes: float, bytes_per_entry: float,
                       row_bytes1: float, row_bytes2: float,
                       symmetric: bool) -> Tuple[int, int]:
  """Largest tile `(b1, b2)` whose memory `bpe*b1*b2 + b1*row1 + b2*row2` fits the budget.

  Square tiles `b x b` (capped at `n1`, `n2`) are preferred; when one side is capped, the
  other grows to use the budget (rectangular case only). Always at least `(1, 1)`.
  """
  def fits(b1, b2):
    return bytes_per_entry * b1 * b2 + b1 * row_bytes1 + b2 * row_bytes2 <= budget_bytes

  # Largest b with bpe*b^2 + b*(row1+row2) <= budget.
  r = row_bytes1 + row_bytes2
  b = int((-r + math.sqrt(r * r + 4 * bytes_per_entry * budget_bytes)) /
          (2 * bytes_per_entry))
  b = max(b, 1)
  while b > 1 and not fits(b, b):
    b -= 1
  if symmetric:
    b = min(b, n1)
    return b, b
  b1, b2 = min(b, n1), min(b, n2)
  if b1 < b:
    b2 = int((budget_bytes - b1 * row_bytes1) / (bytes_per_entry * b1 + row_bytes2))
    b2 = max(min(b2, n2), 1)
  elif b2 < b:
    b1 = int((budget_bytes - b2 * row_bytes2) / (bytes_per_entry * b2 + row_bytes1))
    b1 = max(min(b1, n1), 1)
  return b1, b2


@functools.lru_cache(maxsize=64)
def _tile_program(kernel_fn: KernelFn, mesh: Mesh) -> Callable:
  """jit(shard_map): `(D, b1, ...), (D, b2, ...)` tiles laid along 'tiles' -> `(D, b1, b2)`.

  The extra kernel arguments (a tuple pytree) are replicated on every device.
  """

  def per_device(a, b, args):
    # Each device holds exactly one tile: a (1, b1, ...), b (1, b2, ...).
    return kernel_fn(a[0], b[0], *args)[None]

  spec = P('tiles')
  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, P()),
                               out_specs=spec, check_vma=False))


def _cached_bytes_per_entry(kernel_fn, x1, x2, kernel_args) -> float:
  """`estimate_bytes_per_entry`, memoised per hashable `kernel_fn` and argument shapes."""
  shapes = lambda t: tuple((tuple(np.shape(v)), str(np.asarray(v).dtype))
                           for v in jax.tree.leaves(t))
  key = (kernel_fn, x1.shape[1:], str(x1.dtype), min(PROBE_BLOCK, x1.shape[0]),
         min(PROBE_BLOCK, x2.shape[0]), jax.tree.structure(tuple(kernel_args)),
         shapes(kernel_args))
  try:
    hash(key)
  except TypeError:
    return estimate_bytes_per_entry(kernel_fn, x1, x2, kernel_args=kernel_args)
  if key not in _BYTES_PER_ENTRY:
    _BYTES_PER_ENTRY[key] = estimate_bytes_per_entry(kernel_fn, x1, x2,
                                                     kernel_args=kernel_args)
  return _BYTES_PER_ENTRY[key]


_BYTES_PER_ENTRY = {}


def balanced_block(n: int, b: int) -> int:
  """Block size `<= b` giving as many blocks of `n` as `b` does, as evenly as possible.

  `ceil(n / ceil(n / b))`: the last block then carries little padding. Used for kernel tiles
  here, for the fused kernel's inner tiles and for the AGOP's blocks.
  """
  blocks = -(-n // max(b, 1))
  return -(-n // blocks)


def _block_rows(block: int, size: int, n: int) -> np.ndarray:
  """Example indices of one block; positions past the end repeat the last example."""
  return np.minimum(np.arange(block * size, (block + 1) * size), n - 1)


def _as_progress(progress, total: int):
  """Returns `(update(done), close())` for a callback, `True` (tqdm) or None."""
  if progress is None or progress is False:
    return (lambda done: None), (lambda: None)
  if progress is True:
    from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=total, desc='kernel tiles', unit='tile')
    state = {'done': 0}

    def update(done):
      bar.update(done - state['done'])
      state['done'] = done
    return update, bar.close
  if callable(progress):
    return (lambda done: progress(done, total)), (lambda: None)
  raise TypeError(
      f'`progress` must be None, a bool or a callable progress(done_tiles, total_tiles), got '
      f'{type(progress).__name__}.')


def _check_input(x, name):
  x = checks.check_array(x, name, finite=True)
  if x.ndim < 1:
    raise ValueError(f'`{name}` must have a leading batch axis, got a scalar.')
  return np.asarray(x)


def _check_block_shape(block_size, symmetric) -> Tuple[int, int]:
  if isinstance(block_size, (tuple, list)):
    if len(block_size) != 2:
      raise ValueError(f'`block_size` must be an int or a pair (b1, b2), got {block_size!r}.')
    b1 = checks.check_positive_int(block_size[0], 'block_size[0]')
    b2 = checks.check_positive_int(block_size[1], 'block_size[1]')
  else:
    b1 = b2 = checks.check_positive_int(block_size, 'block_size')
  if symmetric and b1 != b2:
    raise ValueError(
        f'`block_size` must be square for a symmetric matrix (x2=None), got {(b1, b2)}.')
  return b1, b2


def kernel_matrix(kernel_fn: KernelFn,
                  x1,
                  x2=None,
                  *,
                  block_size: Optional[Union[int, Tuple[int, int]]] = None,
                  memory_budget_bytes: Optional[float] = None,
                  bytes_per_entry: Optional[float] = None,
                  devices: Optional[Sequence[jax.Device]] = None,
                  on_host: bool = True,
                  progress: Union[None, bool, Callable[[int, int], None]] = None,
                  kernel_args: Sequence[Any] = ()):
  """The kernel matrix `K[a, b] = kernel_fn(x1[a:a+1], x2[b:b+1])`, computed in tiles on all devices.

  The matrix is cut into `b1 x b2` tiles; each round gives one tile to each device (a batch of
  tiles laid along a one-axis `Mesh` of `devices`, run through `jax.shard_map`), so every
  device runs the same compiled per-tile program and the result is identical, bit for bit,
  for any number of devices. `n1`, `n2` need not be multiples of anything: the last block is
  padded by repeating the last example and cropped. With `x2=None` only tiles on or above
  the block diagonal are computed and the lower blocks are their transposes (diagonal tiles
  are stored as `kernel_fn` returns them).

  Block size: `block_size` if given; otherwise the largest tile whose estimated working memory
  `bytes_per_entry * b1 * b2 + (b1 + b2) * input_row_bytes` fits `memory_budget_bytes`, and at
  most as large as a 512 x 512 tile (`DEFAULT_MAX_BLOCK`; bigger tiles were not faster).
  `bytes_per_entry` defaults to the compiled memory (`memory_analysis()`: temporaries plus
  output) of one 32 x 32 probe block divided by its entries (see
  `estimate_bytes_per_entry`); `memory_budget_bytes` defaults to a quarter of the device's
  `bytes_limit`, or 512 MiB where the device reports none (CPU). A symmetric matrix gets at
  least `SYMMETRIC_MIN_BLOCKS` blocks per side (blocks no narrower than 64), since its
  diagonal tiles are computed whole; automatic blocks are then evened out
  (`ceil(n / ceil(n / b))`), so that the last one carries little padding.

  Args:
    kernel_fn: `kernel_fn(x1_block (b1, ...), x2_block (b2, ...)) -> (b1, b2)`, a jittable
      function of its two blocks (e.g. `functools.partial(jconvrfm.conv_ntk, depth=3,
      patch_size=3)`). It must give each entry independently of the other rows of the block.
    x1: `(n1, ...)` inputs, e.g. NHWC images `(n1, H, W, C)`; any trailing shape, finite.
    x2: `(n2, ...)` inputs with the same trailing shape, or None for the symmetric
      `kernel_fn(x1, x1)`.
    block_size: tile side `b` or `(b1, b2)` (square if `x2` is None).
    memory_budget_bytes: working memory allowed for one tile.
    bytes_per_entry: working bytes per kernel entry (overrides the measurement).
    devices: devices to use, default `jax.devices()` (all devices of all processes; the
      local devices in a single-process run). With devices of several processes
      (multi-host, after `jax.distributed.initialize()`), every process must call this with
      the same `x1`, `x2` and arguments; each process feeds only its own devices' tiles, and
      every process receives the whole matrix (only `on_host=True`).
    on_host: True: return a numpy array filled tile by tile on the host, so no device ever
      holds the whole matrix; False: return a `jax.Array` on `devices[0]`, assembled there
      from the tiles (needs memory for the matrix and its tiles on that device).
    progress: None; True for a tqdm bar; or a callback `progress(done_tiles, total_tiles)`
      called after each round of tiles has finished.
    kernel_args: extra arguments passed to every tile as `kernel_fn(x1_block, x2_block,
      *kernel_args)` (arrays or pytrees of arrays, e.g. a patch metric), replicated on all
      devices and traced, not baked into the program: with a hashable `kernel_fn` (a
      module-level function or a frozen dataclass) a new value reuses the compiled tile
      program, where a fresh closure over the value would compile again.

  Returns:
    `(n1, n2)` kernel matrix of `kernel_fn`'s output dtype (numpy if `on_host`, else a
    `jax.Array`).

  Raises:
    ValueError/TypeError: bad arguments, non-finite inputs, a `kernel_fn` whose output is not
      `(b1, b2)`, or non-finite kernel values (the error names the tile).

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> from jconvrfm import kernel_matrix
    >>> rbf = lambda a, b: jnp.exp(-jnp.sum((a[:, None] - b[None]) ** 2, -1))
    >>> x = np.linspace(0, 1, 10, dtype=np.float32).reshape(5, 2)
    >>> k = kernel_matrix(rbf, x, block_size=2)
    >>> k.shape, bool(np.allclose(k, rbf(x, x)))
    ((5, 5), True)
  """
  if not callable(kernel_fn):
    raise TypeError(f'`kernel_fn` must be callable, got {type(kernel_fn).__name__}.')
  symmetric = x2 is None
  x1 = _check_input(x1, 'x1')
  x2 = x1 if symmetric else _check_input(x2, 'x2')
  if x1.shape[1:] != x2.shape[1:]:
    raise ValueError(
        f'`x1` and `x2` must have the same trailing shape, got {x1.shape} and {x2.shape}.')
  if x1.dtype != x2.dtype:
    raise TypeError(f'`x1` and `x2` must have the same dtype, got {x1.dtype} and {x2.dtype}.')
  if devices is None:
    devices = jax.devices()
  devices = checks.check_devices(devices)
  multi_process = any(d.process_index != jax.process_index() for d in devices)
  if multi_process and not on_host:
    raise ValueError(
        '`on_host=False` needs devices of this process only; with devices of several processes '
        '(multi-host) use `on_host=True` (every process then receives the whole matrix).')
  n1, n2 = x1.shape[0], x2.shape[0]
  update, close = _as_progress(progress, 0)  # Validates `progress` early.

  if block_size is not None:
    if memory_budget_bytes is not None or bytes_per_entry is not None:
      raise ValueError(
          'Give either `block_size` or `memory_budget_bytes`/`bytes_per_entry`, not both.')
    b1, b2 = _check_block_shape(block_size, symmetric)
    b1, b2 = (min(b1, n1), min(b2, n2)) if not symmetric else (min(b1, n1),) * 2
  else:
    for value, name in ((memory_budget_bytes, 'memory_budget_bytes'),
                        (bytes_per_entry, 'bytes_per_entry')):
      if value is not None and (isinstance(value, bool) or not isinstance(
          value, (int, float, np.number)) or not value > 0 or not math.isfinite(value)):
        raise ValueError(f'`{name}` must be a positive number, got {value!r}.')
    budget = memory_budget_bytes or _default_budget(devices)
    bpe = bytes_per_entry or _cached_bytes_per_entry(kernel_fn, x1, x2, kernel_args)
    row = x1.dtype.itemsize * math.prod(x1.shape[1:])
    budget = min(budget, bpe * DEFAULT_MAX_BLOCK**2 + 2 * DEFAULT_MAX_BLOCK * row)
    b1, b2 = choose_block_shape(n1, n2, budget_bytes=budget, bytes_per_entry=bpe,
                                row_bytes1=row, row_bytes2=row, symmetric=symmetric)
    if symmetric:
      b1 = b2 = min(b1, max(-(-n1 // SYMMETRIC_MIN_BLOCKS), _MIN_SYMMETRIC_BLOCK))
    # Same number of blocks, as even as possible: less padding in the last one.
    b1, b2 = balanced_block(n1, b1), balanced_block(n2, b2)

  # Check the kernel's output on one abstract tile before running anything.
  out = jax.eval_shape(kernel_fn, jax.ShapeDtypeStruct((b1,) + x1.shape[1:], x1.dtype),
                       jax.ShapeDtypeStruct((b2,) + x2.shape[1:], x2.dtype), *kernel_args)
  if not hasattr(out, 'shape') or tuple(out.shape) != (b1, b2):
    raise ValueError(
        f'`kernel_fn` must map blocks of {b1} and {b2} examples to a ({b1}, {b2}) matrix, got '
        f'{getattr(out, "shape", out)}.')

  plan = plan_tiles(n1, n2, (b1, b2), symmetric)
  num_devices = len(devices)
  mesh = Mesh(np.array(devices), ('tiles',))
  sharding = NamedSharding(mesh, P('tiles'))
  try:
    program = _tile_program(kernel_fn, mesh)
  except TypeError:  # Unhashable callable: build an uncached program.
    program = _tile_program.__wrapped__(kernel_fn, mesh)
  replicated = NamedSharding(mesh, P())
  # Every process holds the same argument values; each feeds its own devices' copies.
  args = jax.tree.map(
      lambda v: jax.make_array_from_callback(np.shape(v), replicated,
                                             lambda index, v=np.asarray(v): v[index]),
      tuple(kernel_args))
  total = len(plan.tiles)
  update, close = _as_progress(progress, total)
  (nb1, nb2) = plan.grid_shape

  def dispatch(round_tiles):
    # Pad the last round with copies of its last tile; their results are dropped.
    padded = np.concatenate(
        [round_tiles, np.repeat(round_tiles[-1:], num_devices - len(round_tiles), 0)])
    rows1 = np.stack([_block_rows(i, b1, n1) for i in padded[:, 0]])
    rows2 = np.stack([_block_rows(j, b2, n2) for j in padded[:, 1]])
    # Each process builds only the shards of its own devices (all processes hold x1, x2).
    a = jax.make_array_from_callback(rows1.shape + x1.shape[1:], sharding,
                                     lambda index: x1[rows1[index[0]]])
    b = jax.make_array_from_callback(rows2.shape + x2.shape[1:], sharding,
                                     lambda index: x2[rows2[index[0]]])
    return program(a, b, args)

  def check_finite_tile(tile, i, j):
    if not np.all(np.isfinite(tile)):
      raise ValueError(
          f'`kernel_fn` returned {int(np.sum(~np.isfinite(tile)))} non-finite value(s) in the '
          f'tile of rows {i * b1}..{min((i + 1) * b1, n1) - 1}, columns '
          f'{j * b2}..{min((j + 1) * b2, n2) - 1}.')

  rounds = [plan.tiles[s:s + num_devices] for s in range(0, total, num_devices)]
  results = np.empty((n1, n2), dtype=out.dtype) if on_host else []
  done = 0
  try:
    pending = None
    for r in range(len(rounds) + 1):
      current = dispatch(rounds[r]) if r < len(rounds) else None  # Async: overlaps the fetch.
      if pending is not None:
        round_tiles, values = pending
        if on_host:
          if multi_process:  # Every process receives every tile of the round.
            gathered = multihost_utils.process_allgather(values, tiled=True)
            by_index = {t: gathered[t:t + 1] for t in range(num_devices)}
          else:
            by_index = {s.index[0].start or 0: s.data for s in values.addressable_shards}
          for t, (i, j) in enumerate(round_tiles):
            tile = np.asarray(by_index[t])[0]
            check_finite_tile(tile, i, j)
            r0, c0 = i * b1, j * b2
            r1, c1 = min(r0 + b1, n1), min(c0 + b2, n2)
            results[r0:r1, c0:c1] = tile[:r1 - r0, :c1 - c0]
            if symmetric and i != j:
              results[c0:c1, r0:r1] = tile[:r1 - r0, :c1 - c0].T
        else:
          results.append(values[:len(round_tiles)])
        done += len(round_tiles)
        update(done)
      pending = (rounds[r], current) if current is not None else None
  finally:
    close()
  if on_host:
    return results
  tiles = jax.device_put(jnp.concatenate([jax.device_put(t, devices[0]) for t in results]),
                         devices[0])
  bad = ~jnp.isfinite(tiles)
  if bool(jnp.any(bad)):
    t = int(jnp.argmax(jnp.any(bad, axis=(1, 2))))
    i, j = plan.tiles[t]
    check_finite_tile(np.asarray(tiles[t]), i, j)
  index = np.zeros((nb1, nb2), np.int32)
  flip = np.zeros((nb1, nb2), bool)
  for t, (i, j) in enumerate(plan.tiles):
    index[i, j] = t
    if symmetric and i != j:
      index[j, i] = t
      flip[j, i] = True
  return _assemble(tiles, jax.device_put(index, devices[0]), jax.device_put(flip, devices[0]),
                   n1=n1, n2=n2, symmetric=symmetric)


@functools.partial(jax.jit, static_argnames=('n1', 'n2', 'symmetric'))
def _assemble(tiles, index, flip, *, n1, n2, symmetric):
  """`(T, b1, b2)` tiles -> `(n1, n2)` matrix; `index[I, J]` picks a tile, `flip` transposes."""
  grid = tiles[index]  # (nb1, nb2, b1, b2)
  if symmetric:
    grid = jnp.where(flip[..., None, None], jnp.swapaxes(grid, -1, -2), grid)
  nb1, nb2, b1, b2 = grid.shape
  return grid.transpose(0, 2, 1, 3).reshape(nb1 * b1, nb2 * b2)[:n1, :n2]
