"""Deep ConvRFM: greedy, layer-by-layer ConvRFM with random features drawn from the learned M.

Layer `l = 0, 1, ..., layers - 1` (Beaglehole et al., Section 5 / the reference code):

1. run ConvRFM (`convrfm_fit`) on the current feature maps with a CNTK of `depth - l` layers
   and keep the metric `M` of its best round (selected on the validation split; `M = I` if
   round 0 was best, which gives the reference's default random filters);
2. draw `width` random q x q filters from `N(0, M)`: sampler `'sqrt'`: `W = Z M^(1/2)` with
   `Z` standard normal `(width, d)`; sampler `'normal'`: rows from `N(0, M / tr M)`;
3. featurise every image with that convolution (stride 1, the ConvRFM padding, no bias),
   optionally followed by a nonlinearity (default none: the next kernel's ReLU supplies it).

After the last featurisation a final ConvRFM with a CNTK of `depth - layers` layers is fitted
on the learned features. With `convrfm.refit` (default) every ConvRFM refits its chosen ridge
on fit + validation features: for the learned layers this changes only the reported test
scores (the metric `M`, hence the filters, comes from the fit-only predictor); the final
ConvRFM's refit predictor is what `deep_convrfm_predict` uses. The state keeps every layer's
metric, filters and feature-map shape, and `deep_featurize(state, x)` applies the learned
layers to new images.

References:
  D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
  convolutional neural networks. arXiv:2309.00570, 2023.
"""

from typing import Callable, NamedTuple, Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from jconvrfm._src import checks
from jconvrfm._src import cnfa
from jconvrfm._src import convrfm as convrfm_lib
from jconvrfm._src import patches as patches_lib

SAMPLERS = ('sqrt', 'normal')
FILTER_METRICS = ('learned', 'identity')
NONLINEARITIES = {'none': lambda x: x, 'relu': jax.nn.relu, 'tanh': jnp.tanh}


class DeepConvRFMConfig(NamedTuple):
  """Hyperparameters of Deep ConvRFM.

  Attributes:
    convrfm: the per-layer `ConvRFMConfig` (its `depth` is the CNTK depth of layer 0; layer
      l uses `depth - l`).
    layers: number of learned featurisation layers (default `convrfm.depth - 1`, so that the
      final kernel has one layer).
    width: number of random filters per layer.
    sampler: `'sqrt'` (`W = Z M^(1/2)`) or `'normal'` (rows from `N(0, M / tr M)`).
    nonlinearity: `'none'` (reference), `'relu'` or `'tanh'` after each featurisation.
    filter_metric: `'learned'` (default): filters from `N(0, M)` of the layer's best round;
      `'identity'`: an ablation that draws them from `N(0, I)` whatever M was learned (the
      layer's ConvRFM still runs and its M is kept), so that the gain of the learned metric
      can be told apart from that of the random-feature architecture itself.
    seed: seed of the filter draws (the same draws for either `filter_metric`).
  """
  convrfm: convrfm_lib.ConvRFMConfig = convrfm_lib.ConvRFMConfig(depth=5)
  layers: Optional[int] = None
  width: int = 64
  sampler: str = 'sqrt'
  nonlinearity: str = 'none'
  filter_metric: str = 'learned'
  seed: int = 0


class DeepLayer(NamedTuple):
  """One learned layer.

  Attributes:
    index: layer l.
    kernel_depth: CNTK depth used by this layer's ConvRFM.
    metric: `(d, d)` metric of the best round (`d = q*q*c_in`).
    best_round: index of the selected ConvRFM round (0: identity metric).
    filters: `(q, q, c_in, width)` Flax-layout conv kernel drawn from `N(0, M)` (from
      `N(0, I)` with `filter_metric='identity'`).
    input_shape: `(H, W, c_in)` of the feature maps the layer read.
    output_shape: `(H', W', width)` of the feature maps it produced.
    history: the layer's ConvRFM `RoundRecord`s.
  """
  index: int
  kernel_depth: int
  metric: jax.Array
  best_round: int
  filters: jax.Array
  input_shape: Tuple[int, int, int]
  output_shape: Tuple[int, int, int]
  history: Tuple[convrfm_lib.RoundRecord, ...]


class DeepConvRFMState(NamedTuple):
  """A finished Deep ConvRFM run.

  Attributes:
    config: the `DeepConvRFMConfig`.
    layers: tuple of `DeepLayer`.
    final: the `ConvRFMState` of the final ConvRFM on the learned features.
  """
  config: DeepConvRFMConfig
  layers: Tuple[DeepLayer, ...]
  final: convrfm_lib.ConvRFMState


def sample_filters(metric: jax.Array, width: int, key: jax.Array, *, patch_size: int,
                   channels: int, sampler: str = 'sqrt') -> jax.Array:
  """`width` random filters drawn from `N(0, M)`, as a Flax conv kernel `(q, q, c, width)`.

  Args:
    metric: `(d, d)` symmetric PSD `M`, `d = q*q*c` in Flax kernel order.
    width: number of filters.
    key: a `jax.random` key.
    patch_size: q.
    channels: c.
    sampler: `'sqrt'`: rows of `W = Z M^(1/2)`, `Z` standard normal `(width, d)` (so each row
      has covariance `M`); `'normal'`: rows from `N(0, M / tr M)`.

  Returns:
    `(q, q, c, width)` kernel in the dtype of `metric`.

  >>> import jax, jax.numpy as jnp
  >>> sample_filters(jnp.eye(9), 4, jax.random.PRNGKey(0), patch_size=3, channels=1).shape
  (3, 3, 1, 4)
  """
  if sampler not in SAMPLERS:
    raise ValueError(f'`sampler` must be one of {SAMPLERS}, got {sampler!r}.')
  q = checks.check_positive_int(patch_size, 'patch_size')
  c = checks.check_positive_int(channels, 'channels')
  width = checks.check_positive_int(width, 'width')
  metric = checks.check_symmetric_psd(metric, 'metric', q * q * c)
  d = metric.shape[0]
  root = cnfa.sqrt_psd(metric)
  if sampler == 'normal':
    root = root / jnp.sqrt(jnp.trace(metric))
  z = jax.random.normal(key, (width, d), metric.dtype)
  w = z @ root                                       # (width, d), rows ~ N(0, M [/ tr M])
  return w.T.reshape(q, q, c, width)


def filter_metric(config: DeepConvRFMConfig, learned: jax.Array) -> jax.Array:
  """The covariance the filters are drawn from: `learned`, or `I` for the identity ablation."""
  if config.filter_metric == 'identity':
    return jnp.eye(learned.shape[0], dtype=learned.dtype)
  return learned


def featurize_layer(x: jax.Array, filters: jax.Array, *, padding='VALID',
                    nonlinearity: str = 'none') -> jax.Array:
  """Applies one learned layer: stride-1 conv with `filters` (no bias), then `nonlinearity`.

  Args:
    x: `(n, H, W, c)` NHWC maps.
    filters: `(q, q, c, width)` Flax-layout kernel.
    padding: 'VALID', 'SAME' or 'CIRCULAR'.
    nonlinearity: 'none', 'relu' or 'tanh'.

  Returns:
    `(n, H', W', width)` maps, dtype of `x`.
  """
  if nonlinearity not in NONLINEARITIES:
    raise ValueError(f'`nonlinearity` must be one of {sorted(NONLINEARITIES)}, got '
                     f'{nonlinearity!r}.')
  x = checks.check_nhwc(x, 'x')
  pad = checks.canonical_padding(padding)
  q = filters.shape[0]
  if pad == checks.Padding.CIRCULAR:
    # The same split as `patches(..., padding='CIRCULAR')`, so features and patches agree.
    (h_lo, h_hi, _), (w_lo, w_hi, _) = (
        patches_lib.padding_amounts(size, q, 1, pad) for size in x.shape[1:3])
    x = jnp.pad(x, ((0, 0), (h_lo, h_hi), (w_lo, w_hi), (0, 0)), mode='wrap')
    pad = checks.Padding.VALID
  out = jax.lax.conv_general_dilated(
      x, filters.astype(x.dtype), (1, 1), pad.value,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=jax.lax.Precision.HIGHEST)
  return NONLINEARITIES[nonlinearity](out)


def _check_deep_config(config: DeepConvRFMConfig) -> Tuple[DeepConvRFMConfig, int]:
  if not isinstance(config, DeepConvRFMConfig):
    raise TypeError(f'`config` must be a DeepConvRFMConfig, got {type(config).__name__}.')
  base = convrfm_lib.check_config(config.convrfm)
  layers = base.depth - 1 if config.layers is None else config.layers
  layers = checks.check_positive_int(layers, 'config.layers', minimum=0)
  if layers >= base.depth:
    raise ValueError(f'`config.layers` ({layers}) must be smaller than the CNTK depth '
                     f'({base.depth}): layer l uses a kernel of depth - l layers.')
  checks.check_positive_int(config.width, 'config.width')
  if config.sampler not in SAMPLERS:
    raise ValueError(f'`config.sampler` must be one of {SAMPLERS}, got {config.sampler!r}.')
  if config.nonlinearity not in NONLINEARITIES:
    raise ValueError(f'`config.nonlinearity` must be one of {sorted(NONLINEARITIES)}, got '
                     f'{config.nonlinearity!r}.')
  if config.filter_metric not in FILTER_METRICS:
    raise ValueError(f'`config.filter_metric` must be one of {FILTER_METRICS}, got '
                     f'{config.filter_metric!r}.')
  return config._replace(convrfm=base), layers


def deep_convrfm_fit(x_train: jax.Array,
                     y_train: np.ndarray,
                     *,
                     config: DeepConvRFMConfig = DeepConvRFMConfig(),
                     x_val: Optional[jax.Array] = None,
                     y_val: Optional[np.ndarray] = None,
                     x_test: Optional[jax.Array] = None,
                     y_test: Optional[np.ndarray] = None,
                     num_classes: Optional[int] = None,
                     callback: Optional[Callable[[int, convrfm_lib.ConvRFMState], None]] = None
                     ) -> DeepConvRFMState:
  """Fits Deep ConvRFM layer by layer (see the module docstring).

  The validation split is carved once (as `convrfm_init` does) and featurised with every
  layer, so all layers select on the same images.

  Args:
    x_train, y_train, x_val, y_val, x_test, y_test, num_classes: as in `convrfm_init`
      (NHWC images, integer labels).
    config: a `DeepConvRFMConfig`.
    callback: `callback(layer, convrfm_state)` after every ConvRFM round of every layer
      (`layer == len(state.layers)` for the final ConvRFM).

  Returns:
    A `DeepConvRFMState`.

  >>> import numpy as np
  >>> rng = np.random.default_rng(0)
  >>> x = rng.normal(size=(16, 7, 7, 1)).astype(np.float32)
  >>> y = (x[:, 3, 3, 0] > 0).astype(np.int32)
  >>> cfg = DeepConvRFMConfig(
  ...     convrfm=convrfm_lib.ConvRFMConfig(depth=2, rounds=2, val_fraction=0.25), width=4)
  >>> state = deep_convrfm_fit(x, y, config=cfg)
  >>> [layer.output_shape for layer in state.layers], deep_featurize(state, x[:2]).shape
  ([(5, 5, 4)], (2, 5, 5, 4))
  """
  config, n_layers = _check_deep_config(config)
  base = config.convrfm
  # Carve the selection split once, through convrfm_init's checks.
  init = convrfm_lib.convrfm_init(x_train, y_train, config=base._replace(depth=1), x_val=x_val,
                                  y_val=y_val, x_test=x_test, y_test=y_test,
                                  num_classes=num_classes)
  feats = {'fit': init.x_fit, 'val': init.x_val, 'test': init.x_test}
  key = jax.random.PRNGKey(config.seed)
  layers = []

  def run(l, kernel_depth):
    return convrfm_lib.convrfm_fit(
        feats['fit'], init.y_fit, config=base._replace(depth=kernel_depth),
        x_val=feats['val'], y_val=init.y_val, x_test=feats['test'], y_test=init.y_test,
        num_classes=init.num_classes,
        callback=None if callback is None else (lambda s: callback(l, s)))

  for l in range(n_layers):
    state = run(l, base.depth - l)
    best = convrfm_lib.best_round(state)
    c = feats['fit'].shape[-1]
    key, sub = jax.random.split(key)
    filters = sample_filters(filter_metric(config, best.metric), config.width, sub,
                             patch_size=base.patch_size, channels=c, sampler=config.sampler)
    in_shape = tuple(feats['fit'].shape[1:])
    feats = {k: None if v is None else featurize_layer(
        v, filters, padding=base.padding, nonlinearity=config.nonlinearity)
             for k, v in feats.items()}
    layers.append(DeepLayer(index=l, kernel_depth=base.depth - l, metric=best.metric,
                            best_round=best.round, filters=filters, input_shape=in_shape,
                            output_shape=tuple(feats['fit'].shape[1:]),
                            history=state.history))
    logging.info('Deep ConvRFM layer %d: kernel depth %d, best round %d, features %s.', l,
                 base.depth - l, best.round, layers[-1].output_shape)
  final = run(n_layers, base.depth - n_layers)
  return DeepConvRFMState(config=config, layers=tuple(layers), final=final)


def deep_featurize(state: DeepConvRFMState, x: jax.Array) -> jax.Array:
  """Applies the learned layers of `state` to images `x` `(n, H, W, C)` -> last feature maps.

  The images are cast to the ConvRFM dtype; the result is `(n, H_L, W_L, width)`.
  """
  x = checks.check_nhwc(x, 'x').astype(state.config.convrfm.dtype)
  for layer in state.layers:
    if tuple(x.shape[1:]) != layer.input_shape:
      raise ValueError(f'`x`: layer {layer.index} expects maps of shape {layer.input_shape}, '
                       f'got {tuple(x.shape[1:])}.')
    x = featurize_layer(x, layer.filters, padding=state.config.convrfm.padding,
                        nonlinearity=state.config.nonlinearity)
  return x


def deep_convrfm_predict(state: DeepConvRFMState, x: jax.Array) -> jax.Array:
  """Predictions `(n, classes)` of the final ConvRFM on the learned features of `x`."""
  return convrfm_lib.convrfm_predict(state.final, deep_featurize(state, x))
