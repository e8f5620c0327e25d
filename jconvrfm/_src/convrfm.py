"""ConvRFM: a convolutional kernel machine that learns its first-layer patch metric.

One round `t` (Beaglehole et al., Algorithm 1):

1. kernel matrices with the patch metric `M_t` (`M_0 = I`: round 0 is exactly plain CNTK
   ridge regression), normalised by `max K_train` (option: none);
2. ridge regression on one-hot targets for every ridge of a grid (Cholesky, `ridge.py`); the
   ridge, and later the best round, are chosen on a *validation split carved from the
   training data* (`val_fraction`, seeded). The reference protocol (select on the test set)
   is available only as `select_on_test=True`, which is logged as a warning;
2b. refit (`refit=True`, default, as scikit-learn's `GridSearchCV(refit=True)`): the chosen
   ridge is solved again on the kernel over fit + validation images (same metric, same
   scale); this predictor gives the round's test scores and `convrfm_predict`. The fit-only
   predictor is kept (its test scores as `'test_fit_only'`);
3. the patch AGOP `G` of the chosen *fit-only* predictor over `agop_samples` fit images
   (default: all of them, chunked), w.r.t. the untransformed patches (`predictor_agop.py`);
   the validation labels never enter the metric, so selecting rounds on them stays fair;
4. `S = G^power` (negative eigenvalues clipped), keep the top `keep_fraction` of its spectrum,
   normalise to unit Frobenius norm; `M_{t+1} = S^2` (power 1/2: `M` proportional to `G`).

The run is a pure `convrfm_init` / `convrfm_step` pair over an explicit `ConvRFMState` (so a
caller can stop and resume between rounds), `convrfm_fit` loops them, and `convrfm_predict`
applies the selected round. Kernels: the paper's CNTK through the fused Gram engine (default;
its AGOP uses the one-reverse-pass structure), or any neural-tangents stax `kernel_fn` whose
first layer is a q x q, stride-q, VALID conv over expanded patch images (AGOP by autodiff).

References:
  D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
  convolutional neural networks. arXiv:2309.00570, 2023.
"""

import dataclasses
import time
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from jconvrfm._src import checks
from jconvrfm._src import cnfa
from jconvrfm._src import patches as patches_lib
from jconvrfm._src import predictor_agop
from jconvrfm._src import ridge as ridge_lib
from jconvrfm._src.kernels import fused

NORMALIZATIONS = ('max', 'none')


class ConvRFMConfig(NamedTuple):
  """Hyperparameters of a ConvRFM run (reference defaults unless noted).

  Attributes:
    patch_size: q, side of the square patches (the first conv window).
    depth: number of Conv + ReLU layers of the CNTK.
    padding: padding of the patches and of every conv ('VALID', 'SAME', 'CIRCULAR').
    kind: 'ntk' (default) or 'nngp'.
    rounds: number of ridge fits T; round 0 uses `M = I`, so T rounds make T - 1 metric
      updates.
    ridges: the ridge grid.
    normalize: 'max' divides every kernel matrix by `max K_train` (as the reference); 'none'.
    agop_samples: number s of training images averaged in the AGOP (None: all of them; the
      reference used 20).
    power: `S = G^power`, `M = S^2`; 0.5 (default) gives `M` proportional to `G`, 1.0 is the
      reference's option of using `G` itself as `S`.
    keep_fraction: fraction of `S`'s spectrum kept (the reference's "thresh" kept 0.25).
    dtype: 'float32' or 'float64'; images are cast to it explicitly.
    val_fraction: fraction of the training data carved off (seeded) for selection when no
      `x_val` is given.
    select_on_test: the reference protocol: choose ridge and round on the test set (logged).
    refit: after choosing the ridge on the validation split, solve it again on fit +
      validation images and report/predict with that predictor (the metric still comes from
      the fit-only predictor). Ignored (no refit) with `select_on_test`.
    seed: seed of the validation split and of the AGOP sample subset.
    kernel_block_size: tile side for kernel matrices (None: the tiler's default).
    agop_block_elements: memory bound of one AGOP block (see `predictor_agop`).
  """
  patch_size: int = 3
  depth: int = 3
  padding: str = 'VALID'
  kind: str = 'ntk'
  rounds: int = 4
  ridges: Tuple[float, ...] = (1e-8, 1e-5, 1e-3)
  normalize: str = 'max'
  agop_samples: Optional[int] = None
  power: float = 0.5
  keep_fraction: float = 1.0
  dtype: str = 'float32'
  val_fraction: float = 0.2
  select_on_test: bool = False
  refit: bool = True
  seed: int = 0
  kernel_block_size: Optional[int] = None
  agop_block_elements: int = predictor_agop.DEFAULT_BLOCK_ELEMENTS


class RoundRecord(NamedTuple):
  """What one ConvRFM round computed.

  Attributes:
    round: index t (0 = plain CNTK).
    metric: `(d, d)` patch metric `M_t` the kernels used.
    ridge: chosen ridge.
    jitter: Cholesky jitter added beyond the chosen ridge (0.0 if none).
    alpha: `(n_fit, classes)` coefficients of the fit-only predictor for the normalised
      kernel (centres `x_fit`); its AGOP gives `next_metric`.
    kernel_scale: the divisor of the kernel matrices (`max K(x_fit, x_fit)`, or 1.0), shared
      by the fit-only and the refit predictor.
    scores: `{split: {'acc': ..., 'mse': ...}}` for the chosen ridge. 'train' (on `x_fit`)
      and 'val' are the fit-only predictor's; 'test' is the refit predictor's when there is
      one, with the fit-only predictor's test scores under 'test_fit_only', else the
      fit-only predictor's.
    ridge_scores: one `{'ridge', 'jitter', split: {...}}` dict per ridge of the grid (fit-only
      predictors).
    seconds: `{'kernel', 'solve', 'agop'}` wall-clock seconds ('solve' includes the refit).
    next_metric: `(d, d)` `M_{t+1}` from this round's AGOP, or None if no update was made.
    agop: `(d, d)` AGOP `G` of this round's fit-only predictor, or None.
    refit_alpha: `(n_fit + n_val, classes)` coefficients of the refit predictor for the
      normalised kernel (centres `concat(x_fit, x_val)`), or None (no refit).
    refit_jitter: Cholesky jitter of the refit solve beyond the chosen ridge (0.0 if none).
  """
  round: int
  metric: jax.Array
  ridge: float
  jitter: float
  alpha: jax.Array
  kernel_scale: float
  scores: Dict[str, Dict[str, float]]
  ridge_scores: Tuple[Dict[str, Any], ...]
  seconds: Dict[str, float]
  next_metric: Optional[jax.Array]
  agop: Optional[jax.Array]
  refit_alpha: Optional[jax.Array] = None
  refit_jitter: float = 0.0


class ConvRFMState(NamedTuple):
  """A ConvRFM run: data references, finished rounds and the metric of the next round.

  Attributes:
    config: the `ConvRFMConfig`.
    x_fit: `(n_fit, H, W, C)` images the ridge regression is fitted on (config dtype).
    y_fit: `(n_fit,)` int labels.
    x_val, y_val: selection split (None when `select_on_test`); with `config.refit` also
      part of the refit predictor's centres.
    x_test, y_test: optional test split (None if not given).
    num_classes: number of classes (one-hot width).
    history: tuple of `RoundRecord`, one per finished round.
    next_metric: `(d, d)` metric for the next round.
    stax_kernel_fn: a user's neural-tangents `kernel_fn` (None: the fused CNTK).
  """
  config: ConvRFMConfig
  x_fit: jax.Array
  y_fit: np.ndarray
  x_val: Optional[jax.Array]
  y_val: Optional[np.ndarray]
  x_test: Optional[jax.Array]
  y_test: Optional[np.ndarray]
  num_classes: int
  history: Tuple[RoundRecord, ...]
  next_metric: jax.Array
  stax_kernel_fn: Optional[Callable] = None

  @property
  def selection_split(self) -> str:
    return 'test' if self.config.select_on_test else 'val'

  @property
  def refits(self) -> bool:
    """Whether rounds refit the chosen ridge on fit + validation images."""
    return (bool(self.config.refit) and not self.config.select_on_test
            and self.x_val is not None)

  @property
  def done(self) -> bool:
    return len(self.history) >= self.config.rounds


# ----------------------------------------------------------------------------------------------
# Kernels: the fused CNTK, or a stax kernel over expanded patch images.
# ----------------------------------------------------------------------------------------------


def _gram_kernel(depth: int, q: int, padding: checks.Padding, channels: int,
                 kind: fused.Kind) -> fused.GramConvKernel:
  """The fused CNTK of Grams (hashable, so jitted AGOP blocks compile once per setting)."""
  return fused.GramConvKernel(depth, q, padding, channels, kind)


@dataclasses.dataclass(frozen=True)
class _StaxOnPatches:
  """A stax `kernel_fn` as a kernel of patch tensors (each patch written as a q x q block)."""
  kernel_fn: Callable
  q: int
  kind: str

  def __call__(self, p1, p2):
    return self.kernel_fn(_blocks(p1, self.q), _blocks(p2, self.q), self.kind)


def _blocks(p, q):
  n, h, w, d = p.shape
  c = d // (q * q)
  return p.reshape(n, h, w, q, q, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h * q, w * q, c)


def _tiled(kernel, x1, x2, block_size, what, progress=None):
  """`kernel` is `(kernel_fn, kernel_args)` as `_kernel_fn` returns it."""
  from jconvrfm._src import tiling  # pylint: disable=g-import-not-at-top
  kernel_fn, kernel_args = kernel
  cb = None if progress is None else (lambda done, total: progress(what, done, total))
  k = None
  if block_size is None and isinstance(kernel_fn, _FusedTile):
    # The native CPU kernel, and learned metrics on many channels, need no tiles: whole
    # matrices in row chunks, the symmetric one computing only its upper triangle (None where
    # neither applies).
    k = fused.whole_kernel_matrix(x1, x2, kernel_args[0], kernel_fn.depth,
                                  kernel_fn.patch_size, kernel_fn.padding, kernel_fn.kind,
                                  progress=cb)
  if k is None:
    k = tiling.kernel_matrix(kernel_fn, x1, x2, block_size=block_size, progress=cb,
                             kernel_args=kernel_args)
  k = jnp.asarray(k)
  if not bool(jnp.all(jnp.isfinite(k))):
    raise ValueError(f'The {what} kernel matrix has NaN or Inf entries.')
  return k


@dataclasses.dataclass(frozen=True)
class _FusedTile:
  """`(x1 block, x2 block, metric) -> (b1, b2)` fused CNTK; hashable, so every round (a new
  metric, passed as a traced argument) reuses one compiled tile program."""
  depth: int
  patch_size: int
  padding: checks.Padding
  kind: fused.Kind

  def __call__(self, a, b, metric):
    return fused.fused_conv_kernel(a, b, metric, self.depth, self.patch_size, self.padding,
                                   self.kind)


def _kernel_fn(state: ConvRFMState, metric: jax.Array):
  """`(kernel_fn, kernel_args)`: `kernel_fn(x1 block, x2 block, *kernel_args) -> (b1, b2)` for
  this state's kernel with patch metric `metric` `(d, d)`.

  The fused kernel takes the metric as a traced argument in every round, the identity of
  round 0 included (`fused.metric_argument`: for patch dimensions up to 64), so that all
  rounds share one compiled tile program, one memory probe and one diagonal program: on a
  2-core CPU a separate identity-metric program cost about 3 s of compilation per run. A
  stax kernel skips the transform when `metric` is the identity.
  """
  cfg = state.config
  pad = checks.canonical_padding(cfg.padding)
  kind = fused.canonical_kind(cfg.kind)
  if state.stax_kernel_fn is not None:
    on_patches = _StaxOnPatches(state.stax_kernel_fn, cfg.patch_size, kind.value)
    root = None if checks.is_identity(metric) else cnfa.sqrt_psd(metric)   # concrete

    def transformed(x):
      p = patches_lib.patches(x, cfg.patch_size, padding=pad)
      return p if root is None else p @ root

    return (lambda a, b: on_patches(transformed(a), transformed(b))), ()
  return _FusedTile(cfg.depth, cfg.patch_size, pad, kind), (fused.metric_argument(metric),)


def _predictor_agop(state: ConvRFMState, alpha, z_indices, metric, progress=None):
  cfg = state.config
  pad = checks.canonical_padding(cfg.padding)
  kind = fused.canonical_kind(cfg.kind)
  kwargs = dict(patch_size=cfg.patch_size, padding=pad, metric=metric,
                block_elements=cfg.agop_block_elements, progress=progress)
  if state.stax_kernel_fn is not None:
    fn = _StaxOnPatches(state.stax_kernel_fn, cfg.patch_size, kind.value)
    return predictor_agop.predictor_agop_autodiff(fn, state.x_fit, alpha,
                                                  z_indices=z_indices, **kwargs)
  fn = _gram_kernel(cfg.depth, cfg.patch_size, pad, state.x_fit.shape[-1], kind)
  return predictor_agop.predictor_agop_from_grams(fn, state.x_fit, alpha, z_indices=z_indices,
                                                  **kwargs)


# ----------------------------------------------------------------------------------------------
# Checks and set-up.
# ----------------------------------------------------------------------------------------------


def check_config(config: ConvRFMConfig) -> ConvRFMConfig:
  """Validates a config and returns it with normalised fields; raises `ValueError`."""
  if not isinstance(config, ConvRFMConfig):
    raise TypeError(f'`config` must be a ConvRFMConfig, got {type(config).__name__}.')
  checks.check_positive_int(config.patch_size, 'config.patch_size')
  checks.check_positive_int(config.depth, 'config.depth')
  checks.check_positive_int(config.rounds, 'config.rounds')
  checks.canonical_padding(config.padding, 'config.padding')
  fused.canonical_kind(config.kind, 'config.kind')
  ridges = tuple(float(r) for r in config.ridges)
  if not ridges or any(not np.isfinite(r) or r < 0 for r in ridges):
    raise ValueError(f'`config.ridges` must be a non-empty list of finite ridges >= 0, got '
                     f'{config.ridges}.')
  if config.normalize not in NORMALIZATIONS:
    raise ValueError(f'`config.normalize` must be one of {NORMALIZATIONS}, got '
                     f'{config.normalize!r}.')
  if config.agop_samples is not None:
    checks.check_positive_int(config.agop_samples, 'config.agop_samples')
  if not np.isfinite(config.power) or config.power <= 0:
    raise ValueError(f'`config.power` must be > 0, got {config.power}.')
  if not 0 < config.keep_fraction <= 1:
    raise ValueError(f'`config.keep_fraction` must lie in (0, 1], got {config.keep_fraction}.')
  if config.dtype not in ('float32', 'float64'):
    raise ValueError(f'`config.dtype` must be "float32" or "float64", got {config.dtype!r}.')
  if not isinstance(config.refit, (bool, np.bool_)):
    raise ValueError(f'`config.refit` must be a bool, got {config.refit!r}.')
  if not 0 <= config.val_fraction < 1:
    raise ValueError(f'`config.val_fraction` must lie in [0, 1), got {config.val_fraction}.')
  checks.check_positive_int(config.agop_block_elements, 'config.agop_block_elements')
  return config._replace(ridges=ridges, refit=bool(config.refit))


def _check_split(x, y, name, dtype, num_classes=None, shape=None):
  x = checks.check_nhwc(x, f'x_{name}')
  if shape is not None and tuple(x.shape[1:]) != tuple(shape):
    raise ValueError(f'`x_{name}` images must have shape {tuple(shape)} like x_train, got '
                     f'{tuple(x.shape[1:])}.')
  y = np.asarray(y)
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f'`y_{name}` must be a 1-D array of integer class labels, got shape '
                     f'{y.shape} and dtype {y.dtype}.')
  if y.shape[0] != x.shape[0]:
    raise ValueError(f'`y_{name}` has {y.shape[0]} labels but `x_{name}` has {x.shape[0]} '
                     'images.')
  if y.min() < 0 or (num_classes is not None and y.max() >= num_classes):
    raise ValueError(f'`y_{name}` labels must lie in [0, {num_classes}), got range '
                     f'[{y.min()}, {y.max()}].')
  return x.astype(dtype), y.astype(np.int32)


def convrfm_init(x_train: jax.Array,
                 y_train: np.ndarray,
                 *,
                 config: ConvRFMConfig = ConvRFMConfig(),
                 x_val: Optional[jax.Array] = None,
                 y_val: Optional[np.ndarray] = None,
                 x_test: Optional[jax.Array] = None,
                 y_test: Optional[np.ndarray] = None,
                 num_classes: Optional[int] = None,
                 stax_kernel_fn: Optional[Callable] = None) -> ConvRFMState:
  """Validates the data, carves the validation split and returns the state before round 0.

  Args:
    x_train: `(n, H, W, C)` NHWC training images (cast to `config.dtype`).
    y_train: `(n,)` integer labels in `[0, num_classes)`.
    config: a `ConvRFMConfig`.
    x_val, y_val: an explicit selection split; if None, `config.val_fraction` of the training
      data is carved off with `config.seed` (unless `config.select_on_test`).
    x_test, y_test: optional test split (scored every round; required by `select_on_test`).
    num_classes: one-hot width; default `1 + max` label over all given splits.
    stax_kernel_fn: optional neural-tangents `kernel_fn(x1, x2, get)` of a model whose first
      layer is `Conv(k, (q, q), strides=(q, q), padding='VALID')` over expanded patch images
      (see `jconvrfm._src.kernels.nt.stax_conv_kernel`); default: the fused CNTK of
      `config.depth` layers.

  Returns:
    A `ConvRFMState` with no finished rounds and `next_metric = I`.

  Raises:
    ValueError: bad config, shapes, labels, NaN pixels, empty splits, or no selection split.
  """
  config = check_config(config)
  dtype = jnp.dtype(config.dtype)
  x_train = checks.check_nhwc(x_train, 'x_train')
  shape = tuple(x_train.shape[1:])
  ys = [np.asarray(y) for y in (y_train, y_val, y_test) if y is not None]
  if num_classes is None:
    num_classes = 1 + max(int(np.max(y)) for y in ys if np.size(y))
  num_classes = checks.check_positive_int(num_classes, 'num_classes', minimum=2)
  x_train, y_train = _check_split(x_train, y_train, 'train', dtype, num_classes, shape)
  if (x_val is None) != (y_val is None):
    raise ValueError('`x_val` and `y_val` must be given together.')
  if (x_test is None) != (y_test is None):
    raise ValueError('`x_test` and `y_test` must be given together.')
  if x_test is not None:
    x_test, y_test = _check_split(x_test, y_test, 'test', dtype, num_classes, shape)
  if config.select_on_test:
    if x_test is None:
      raise ValueError('`config.select_on_test` needs `x_test` and `y_test`.')
    logging.warning('ConvRFM: select_on_test=True -- ridge and round are chosen on the TEST '
                    'set (the reference protocol); test scores are optimistic.')
    x_fit, y_fit = x_train, y_train
    if x_val is not None:
      x_val, y_val = _check_split(x_val, y_val, 'val', dtype, num_classes, shape)
  elif x_val is not None:
    x_val, y_val = _check_split(x_val, y_val, 'val', dtype, num_classes, shape)
    x_fit, y_fit = x_train, y_train
  else:
    n = x_train.shape[0]
    n_val = int(np.floor(config.val_fraction * n))
    if n_val < 1 or n - n_val < 1:
      raise ValueError(
          f'No selection split: `config.val_fraction` = {config.val_fraction} of {n} '
          'training images leaves an empty validation or fitting set; pass `x_val`/`y_val`, '
          'raise `val_fraction`, or set `select_on_test` (reference protocol).')
    perm = np.random.default_rng(config.seed).permutation(n)
    x_fit, y_fit = x_train[perm[n_val:]], y_train[perm[n_val:]]
    x_val, y_val = x_train[perm[:n_val]], y_train[perm[:n_val]]
  q = config.patch_size
  pad = checks.canonical_padding(config.padding)
  if pad == checks.Padding.VALID and q > min(shape[0], shape[1]):
    raise ValueError(f'`config.patch_size` ({q}) exceeds the image size {shape[:2]} with VALID '
                     'padding.')
  d = q * q * shape[2]
  return ConvRFMState(config=config, x_fit=x_fit, y_fit=y_fit, x_val=x_val, y_val=y_val,
                      x_test=x_test, y_test=y_test, num_classes=num_classes, history=(),
                      next_metric=jnp.eye(d, dtype=dtype), stax_kernel_fn=stax_kernel_fn)


# ----------------------------------------------------------------------------------------------
# One round.
# ----------------------------------------------------------------------------------------------


def _scores(pred, labels, num_classes):
  pred = np.asarray(pred, dtype=np.float64)
  onehot = np.eye(num_classes)[labels]
  return {'acc': float(np.mean(np.argmax(pred, axis=1) == labels)),
          'mse': float(np.mean((pred - onehot)**2))}


def _better(a, b):
  """True if scores `a` beat `b` (higher accuracy, then lower MSE)."""
  return (a['acc'], -a['mse']) > (b['acc'], -b['mse'])


def metric_from_agop(agop: jax.Array, *, power: float = 0.5,
                     keep_fraction: float = 1.0) -> jax.Array:
  """The next patch metric `M = S^2` from an AGOP `G` (d x d).

  `S = G^power` (negative eigenvalues clipped, `cnfa.matrix_power_psd`), keeping only the top
  `ceil(keep_fraction * d)` eigenvalues of `S`, then `S / ||S||_F`; returns `S @ S`.

  >>> import jax.numpy as jnp
  >>> metric_from_agop(jnp.diag(jnp.array([4.0, 0.0]))).tolist()
  [[1.0, 0.0], [0.0, 0.0]]
  """
  s = cnfa.matrix_power_psd(agop, power)
  d = s.shape[0]
  if keep_fraction < 1:
    keep = int(np.ceil(keep_fraction * d))
    e, u = jnp.linalg.eigh(s)
    e = jnp.where(jnp.arange(d) >= d - keep, e, 0)
    s = (u * e) @ u.T
  norm = jnp.linalg.norm(s)
  if not bool(norm > 0):
    raise ValueError('The AGOP is zero (the predictor is constant in the patches); no metric '
                     'can be formed from it.')
  s = s / norm
  m = s @ s
  return (m + m.T) / 2


def _timed(fn, *args):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def convrfm_step(state: ConvRFMState,
                 *,
                 update_metric: Optional[bool] = None,
                 progress: Optional[Callable[[str, int, int], None]] = None) -> ConvRFMState:
  """Runs one ConvRFM round and returns the state with its `RoundRecord` appended.

  Kernel matrices: without refit, `K(x_fit, x_fit)` and `K(concat(x_val, x_test), x_fit)`;
  with refit (`state.refits`), `K(x_tr, x_tr)` and `K(x_test, x_tr)` for
  `x_tr = concat(x_fit, x_val)`, whose fit columns serve the ridge choice. Both predictors
  are normalised by `max K(x_fit, x_fit)`, so round 0 is plain CNTK ridge regression on the
  fit images.

  Args:
    state: from `convrfm_init` or a previous step (`state.done` must be False).
    update_metric: compute the AGOP and `next_metric` (default: unless this is the last
      round of `config.rounds`).
    progress: optional `progress(phase, done, total)` called as kernel tiles ('training',
      'evaluation': tiles done of total) and AGOP blocks ('agop': sample images done of s)
      finish.

  Returns:
    The new state (the input state is not modified).
  """
  cfg = state.config
  if state.done:
    raise ValueError(f'The run has finished all {cfg.rounds} rounds.')
  t = len(state.history)
  metric = state.next_metric
  kfn = _kernel_fn(state, metric)

  # Kernel matrices. Without refit: (fit, fit) and (val + test, fit), one tiled pass each.
  # With refit: (fit + val, fit + val) (upper tiles only) and (test, fit + val); the fit-only
  # blocks used for the ridge choice are sliced out of them.
  refit = state.refits
  n_fit = state.x_fit.shape[0]
  x_train = jnp.concatenate([state.x_fit, state.x_val]) if refit else state.x_fit
  start = time.perf_counter()
  k_train = _tiled(kfn, x_train, None, cfg.kernel_block_size, 'training', progress)
  if state.stax_kernel_fn is None:
    # Exact diagonal K(x, x) (angle exactly 0 at every layer), as `conv_ntk(x)` gives it; the
    # tiles compute it through the arccos kink at cos t = 1 (~1e-4 relative in float32).
    diag = fused.fused_self_kernel(x_train, fused.metric_argument(metric), cfg.depth,
                                   cfg.patch_size, checks.canonical_padding(cfg.padding),
                                   fused.canonical_kind(cfg.kind))
    n_train = k_train.shape[0]
    k_train = k_train.at[jnp.arange(n_train), jnp.arange(n_train)].set(diag)
  k_fit = k_train[:n_fit, :n_fit] if refit else k_train
  k_evals = {}     # split -> (n_split, n_fit) kernel against the fit images
  k_test_train = None   # (n_test, n_fit + n_val), refit only
  if refit:
    k_evals['val'] = k_train[n_fit:, :n_fit]
    if state.x_test is not None:
      k_test_train = _tiled(kfn, state.x_test, x_train, cfg.kernel_block_size, 'evaluation',
                            progress)
      k_evals['test'] = k_test_train[:, :n_fit]
  else:
    evals = [(name, x) for name, x in (('val', state.x_val), ('test', state.x_test))
             if x is not None]
    if evals:
      x_eval = jnp.concatenate([x for _, x in evals])
      k_eval = _tiled(kfn, x_eval, state.x_fit, cfg.kernel_block_size, 'evaluation', progress)
      offset = 0
      for name, x in evals:
        k_evals[name] = k_eval[offset:offset + x.shape[0]]
        offset += x.shape[0]
  jax.block_until_ready((k_train, k_evals, k_test_train))
  t_kernel = time.perf_counter() - start
  scale = float(jnp.max(k_fit)) if cfg.normalize == 'max' else 1.0
  if not scale > 0:
    raise ValueError(f'max K_train = {scale} is not positive; cannot normalise the kernel.')
  k_train = k_train / scale
  k_fit = k_train[:n_fit, :n_fit] if refit else k_train
  k_evals = {name: k / scale for name, k in k_evals.items()}
  if k_test_train is not None:
    k_test_train = k_test_train / scale

  # Ridge grid on the fit images, selection on the selection split.
  start = time.perf_counter()
  labels = {'val': state.y_val, 'test': state.y_test}
  onehot = jnp.eye(state.num_classes, dtype=k_fit.dtype)
  sel = state.selection_split
  table, best = [], None
  for lam in cfg.ridges:
    sol = ridge_lib.ridge_solve(k_fit, onehot[state.y_fit], lam)
    if sol.jitter > 0:
      logging.info('ConvRFM round %d: ridge %g needed Cholesky jitter %.3g.', t, lam,
                   sol.jitter)
    row = {'ridge': lam, 'jitter': sol.jitter,
           'train': _scores(k_fit @ sol.alpha, state.y_fit, state.num_classes)}
    for name, k in k_evals.items():
      row[name] = _scores(k @ sol.alpha, labels[name], state.num_classes)
    table.append(row)
    if best is None or _better(row[sel], best[0][sel]):
      best = (row, sol)
  row, sol = best
  scores = {k: v for k, v in row.items() if k in ('train', 'val', 'test')}

  # Refit: the chosen ridge on fit + validation images, same metric and scale.
  refit_sol = None
  if refit:
    y_train = np.concatenate([state.y_fit, state.y_val])
    refit_sol = ridge_lib.ridge_solve(k_train, onehot[y_train], row['ridge'])
    if refit_sol.jitter > 0:
      logging.info('ConvRFM round %d: refit with ridge %g needed Cholesky jitter %.3g.', t,
                   row['ridge'], refit_sol.jitter)
    if k_test_train is not None:
      scores['test_fit_only'] = scores['test']
      scores['test'] = _scores(k_test_train @ refit_sol.alpha, state.y_test,
                               state.num_classes)
  t_solve = time.perf_counter() - start

  # AGOP of the chosen fit-only predictor (never the refit one: the validation labels must
  # not shape the metric) and the next metric.
  if update_metric is None:
    update_metric = t + 1 < cfg.rounds
  agop, next_metric, t_agop = None, None, 0.0
  if update_metric:
    s = n_fit if cfg.agop_samples is None else min(cfg.agop_samples, n_fit)
    idx = np.sort(np.random.default_rng(cfg.seed + 1 + t).permutation(n_fit)[:s])
    done = [0]

    def report_agop(k):
      done[0] += k
      progress('agop', done[0], s)

    start = time.perf_counter()
    agop = _predictor_agop(state, sol.alpha / scale, idx, metric,
                           None if progress is None else report_agop)
    next_metric = metric_from_agop(agop, power=cfg.power, keep_fraction=cfg.keep_fraction)
    jax.block_until_ready(next_metric)
    t_agop = time.perf_counter() - start

  record = RoundRecord(
      round=t, metric=metric, ridge=row['ridge'], jitter=row['jitter'], alpha=sol.alpha,
      kernel_scale=scale, scores=scores, ridge_scores=tuple(table),
      seconds={'kernel': t_kernel, 'solve': t_solve, 'agop': t_agop},
      next_metric=next_metric, agop=agop,
      refit_alpha=None if refit_sol is None else refit_sol.alpha,
      refit_jitter=0.0 if refit_sol is None else refit_sol.jitter)
  logging.info('ConvRFM round %d: ridge %g, %s; kernel %.1fs, solve %.1fs, AGOP %.1fs.', t,
               record.ridge, ', '.join(f'{k} acc {v["acc"]:.4f}' for k, v in scores.items()),
               t_kernel, t_solve, t_agop)
  return state._replace(
      history=state.history + (record,),
      next_metric=next_metric if next_metric is not None else metric)


def best_round(state: ConvRFMState) -> RoundRecord:
  """The finished round with the best selection-split score (accuracy, then MSE)."""
  if not state.history:
    raise ValueError('No finished rounds: run `convrfm_step` (or `convrfm_fit`) first.')
  best = state.history[0]
  sel = state.selection_split
  for rec in state.history[1:]:
    if _better(rec.scores[sel], best.scores[sel]):
      best = rec
  return best


def convrfm_fit(x_train: jax.Array,
                y_train: np.ndarray,
                *,
                config: ConvRFMConfig = ConvRFMConfig(),
                x_val: Optional[jax.Array] = None,
                y_val: Optional[np.ndarray] = None,
                x_test: Optional[jax.Array] = None,
                y_test: Optional[np.ndarray] = None,
                num_classes: Optional[int] = None,
                stax_kernel_fn: Optional[Callable] = None,
                callback: Optional[Callable[[ConvRFMState], None]] = None) -> ConvRFMState:
  """Runs all `config.rounds` ConvRFM rounds; `convrfm_init` then `convrfm_step` repeatedly.

  Args:
    x_train, y_train, config, x_val, y_val, x_test, y_test, num_classes, stax_kernel_fn: see
      `convrfm_init`.
    callback: called with the state after every round.

  Returns:
    The final `ConvRFMState`; `best_round(state)` is the selected round and
    `convrfm_predict(state, x)` uses it.

  >>> import numpy as np
  >>> rng = np.random.default_rng(0)
  >>> x = rng.normal(size=(20, 6, 6, 1)).astype(np.float32)
  >>> y = (x[:, 2:4, 2:4, 0].mean(axis=(1, 2)) > 0).astype(np.int32)
  >>> cfg = ConvRFMConfig(depth=1, rounds=2, val_fraction=0.25)
  >>> state = convrfm_fit(x, y, config=cfg)
  >>> len(state.history), convrfm_predict(state, x[:3]).shape
  (2, (3, 2))
  """
  state = convrfm_init(x_train, y_train, config=config, x_val=x_val, y_val=y_val,
                       x_test=x_test, y_test=y_test, num_classes=num_classes,
                       stax_kernel_fn=stax_kernel_fn)
  while not state.done:
    state = convrfm_step(state)
    if callback is not None:
      callback(state)
  return state


def convrfm_predict(state: ConvRFMState, x: jax.Array,
                    record: Optional[RoundRecord] = None, *,
                    fit_only: bool = False) -> jax.Array:
  """Predictions `(n, classes)` of the selected round (or of `record`) on images `x`.

  The round's refit predictor (centres `concat(x_fit, x_val)`, `record.refit_alpha`) when it
  has one, else its fit-only predictor (centres `x_fit`, `record.alpha`).

  Args:
    state: a state with at least one finished round.
    x: `(n, H, W, C)` NHWC images shaped like the training images (cast to `config.dtype`).
    record: a specific round of `state.history` (default: `best_round(state)`).
    fit_only: use the fit-only predictor even if the round has a refit one.

  Returns:
    `(n, classes)` real-valued outputs `K(x, centres) alpha / scale`, dtype `config.dtype`.

  Raises:
    ValueError: bad images, or a refit record whose coefficients do not match the state's
      fit + validation images.
  """
  rec = best_round(state) if record is None else record
  x = checks.check_nhwc(x, 'x')
  if tuple(x.shape[1:]) != tuple(state.x_fit.shape[1:]):
    raise ValueError(f'`x` images must have shape {tuple(state.x_fit.shape[1:])} like the '
                     f'training images, got {tuple(x.shape[1:])}.')
  x = x.astype(state.config.dtype)
  if rec.refit_alpha is not None and not fit_only:
    if state.x_val is None:
      raise ValueError('`record` has refit coefficients but `state` has no validation images '
                       '(`state.x_val` is None).')
    centres = jnp.concatenate([state.x_fit, state.x_val])
    alpha = rec.refit_alpha
  else:
    centres, alpha = state.x_fit, rec.alpha
  if alpha.shape[0] != centres.shape[0]:
    raise ValueError(f'`record` has {alpha.shape[0]} coefficients per class but the state has '
                     f'{centres.shape[0]} centre images.')
  kfn = _kernel_fn(state, rec.metric)
  k = _tiled(kfn, x, centres, state.config.kernel_block_size, 'prediction')
  return (k / rec.kernel_scale) @ alpha
