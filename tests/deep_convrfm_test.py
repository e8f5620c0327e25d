"""Tests for jconvrfm._src.deep_convrfm (layer-wise Deep ConvRFM)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jconvrfm._src import convrfm as crfm
from jconvrfm._src import deep_convrfm as deep
from jconvrfm._src import patches as patches_lib
from tests import tolerances

CFG = deep.DeepConvRFMConfig(
    convrfm=crfm.ConvRFMConfig(depth=2, rounds=2, ridges=(1e-6, 1e-2), dtype='float64',
                               val_fraction=0.25),
    width=5, seed=1)


def _data(seed, n):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 8, 8, 1))
  return x, (x[:, 3:5, 3:5, 0].mean(axis=(1, 2)) > 0).astype(np.int32)


@pytest.mark.parametrize('sampler', ['sqrt', 'normal'])
def test_sampled_filters_have_covariance_m(sampler):
  # Monte Carlo: the empirical covariance of many filters approaches M (or M / tr M).
  rng = np.random.default_rng(0)
  f = rng.normal(size=(18, 18))
  m = f @ f.T / 18
  w = deep.sample_filters(jnp.asarray(m), 40000, jax.random.PRNGKey(0), patch_size=3,
                          channels=2, sampler=sampler)
  assert w.shape == (3, 3, 2, 40000)
  rows = np.asarray(w).reshape(18, -1)
  cov = rows @ rows.T / rows.shape[1]
  want = m if sampler == 'sqrt' else m / np.trace(m)
  tolerances.assert_rel_fro(cov, want, 0.03, f'filter covariance ({sampler})')


def test_featurize_layer_is_patches_times_filters():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)))
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)))
  for padding in ('VALID', 'SAME', 'CIRCULAR'):
    got = deep.featurize_layer(x, w, padding=padding)
    want = patches_lib.patches(x, 3, padding=padding) @ w.reshape(27, 4)
    tolerances.assert_rel_fro(got, want, 1e-12, padding)
  relu = deep.featurize_layer(x, w, nonlinearity='relu')
  tolerances.assert_rel_fro(relu, jnp.maximum(deep.featurize_layer(x, w), 0), 0)


def test_fit_layers_featurize_and_predict():
  x, y = _data(0, 16)
  xt, yt = _data(1, 6)
  state = deep.deep_convrfm_fit(x, y, config=CFG, x_test=xt, y_test=yt)
  assert len(state.layers) == 1  # depth 2 -> one learned layer, final kernel of depth 1
  layer = state.layers[0]
  assert layer.kernel_depth == 2 and state.final.config.depth == 1
  assert layer.input_shape == (8, 8, 1) and layer.output_shape == (6, 6, 5)
  assert layer.filters.shape == (3, 3, 1, 5)
  assert layer.metric.shape == (9, 9)
  best = crfm.best_round(crfm.ConvRFMState(*([None] * 8), history=layer.history,
                                           next_metric=None)._replace(
                                               config=CFG.convrfm))
  assert layer.best_round == best.round
  tolerances.assert_rel_fro(layer.metric, best.metric, 0)
  # The final ConvRFM was fitted on the featurised fit split, reproducible by deep_featurize.
  feats = deep.deep_featurize(state, xt)
  assert feats.shape == (6, 6, 6, 5)
  tolerances.assert_rel_fro(feats, state.final.x_test, 1e-12, 'test features')
  pred = deep.deep_convrfm_predict(state, xt)
  acc = float(np.mean(np.asarray(pred).argmax(1) == yt))
  assert acc == crfm.best_round(state.final).scores['test']['acc']
  # Refit by default: the final predictor has fit + val centres, the layers' metrics come from
  # the fit-only predictors (their AGOPs are what the records keep).
  assert all(r.refit_alpha is not None for r in state.final.history + layer.history)
  assert state.final.history[0].refit_alpha.shape[0] == 16


@pytest.mark.parametrize('change,match', [
    (dict(layers=2), 'smaller than the CNTK depth'),
    (dict(sampler='uniform'), 'sampler'),
    (dict(nonlinearity='gelu'), 'nonlinearity'),
    (dict(width=0), 'width'),
    (dict(filter_metric='random'), 'filter_metric'),
])
def test_bad_config(change, match):
  x, y = _data(2, 12)
  with pytest.raises(ValueError, match=match):
    deep.deep_convrfm_fit(x, y, config=CFG._replace(**change))


def test_featurize_rejects_wrong_shape():
  x, y = _data(3, 12)
  state = deep.deep_convrfm_fit(x, y, config=CFG._replace(
      convrfm=CFG.convrfm._replace(rounds=1)))
  with pytest.raises(ValueError, match='expects maps of shape'):
    deep.deep_featurize(state, np.zeros((1, 9, 9, 1)))


def test_identity_filter_ablation_draws_the_same_normals_from_n0i():
  """`filter_metric='identity'` keeps the learned M but draws the filters as Z I^(1/2) = Z."""
  x, y = _data(4, 20)
  learned = deep.deep_convrfm_fit(x, y, config=CFG._replace(layers=1))
  ablation = deep.deep_convrfm_fit(x, y, config=CFG._replace(layers=1,
                                                             filter_metric='identity'))
  la, lb = learned.layers[0], ablation.layers[0]
  tolerances.assert_rel_fro(lb.metric, la.metric, 0, 'the layer ConvRFM is unchanged')
  _, sub = jax.random.split(jax.random.PRNGKey(CFG.seed))
  # Independent of sample_filters: its 'sqrt' draw is Z M^(1/2) with Z standard normal.
  z = np.asarray(jax.random.normal(sub, (5, 9), jnp.float64))
  tolerances.assert_rel_fro(np.asarray(lb.filters).reshape(9, 5), z.T, 1e-12, 'N(0, I) draw')
  w = np.asarray(la.filters).reshape(9, 5).T                  # rows z_i M^(1/2)
  # Same normals: w = z S with S the PSD root of M, so w^T w = S z^T z S.
  evals, evecs = np.linalg.eigh(np.asarray(la.metric))
  s = (evecs * np.sqrt(np.clip(evals, 0, None))) @ evecs.T
  tolerances.assert_rel_fro(w, z @ s, 1e-9, 'N(0, M) draw from the same normals')
