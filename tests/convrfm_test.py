"""Tests for jconvrfm._src.convrfm (ConvRFM fit / step / predict)."""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jconvrfm
from jconvrfm._src import convrfm as crfm
from jconvrfm._src import patches as patches_lib
from jconvrfm._src.kernels import fused
from jconvrfm._src.kernels import nt
from tests import tolerances

CFG = crfm.ConvRFMConfig(patch_size=3, depth=2, rounds=2, ridges=(1e-6, 1e-2), dtype='float64',
                         val_fraction=0.25, seed=3)


def _data(seed, n, size=7, channels=1):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, size, size, channels))
  # Local signal: the sign of one fixed pixel block decides the class (3 classes).
  s = x[:, 2:4, 3:5, 0].mean(axis=(1, 2))
  y = np.digitize(s, [-0.3, 0.3]).astype(np.int32)
  return x, y


def _ntk(x1, x2=None, metric=None):
  """Independent reference kernel: the public CNTK of CFG, untiled, as float64 numpy."""
  x2 = None if x2 is None else jnp.asarray(x2)
  metric = None if metric is None else jnp.asarray(metric)
  return np.asarray(jconvrfm.conv_ntk(jnp.asarray(x1), x2, depth=2, patch_size=3,
                                      metric=metric), np.float64)


def _score(pred, labels):
  return np.mean(pred.argmax(1) == labels), np.mean((pred - np.eye(3)[labels])**2)


@pytest.mark.parametrize('refit', [True, False])
def test_round0_is_plain_cntk_ridge_regression(refit):
  x, y = _data(0, 20)
  xt, yt = _data(1, 8)
  state = crfm.convrfm_init(x, y, config=CFG._replace(refit=refit), x_test=xt, y_test=yt)
  state = crfm.convrfm_step(state, update_metric=False)
  rec = state.history[0]
  # Independent reference: the public CNTK on the same split, untiled, and numpy solves.
  xf, yf, xv, yv = map(np.asarray, (state.x_fit, state.y_fit, state.x_val, state.y_val))
  k, kv, kt = _ntk(xf), _ntk(xv, xf), _ntk(xt, xf)
  scale = k.max()
  onehot = np.eye(3)[yf]
  best = None
  for lam in CFG.ridges:
    alpha = np.linalg.solve(k / scale + lam * np.eye(len(yf)), onehot)
    acc, mse = _score(kv / scale @ alpha, yv)
    if best is None or (acc, -mse) > best[:2]:
      best = (acc, -mse, lam, alpha)
  assert rec.ridge == best[2]
  assert math.isclose(rec.kernel_scale, scale, rel_tol=1e-10)
  tolerances.assert_rel_fro(rec.alpha, best[3], 1e-6, 'alpha')
  assert rec.scores['val']['acc'] == best[0]
  np.testing.assert_array_equal(rec.metric, np.eye(9))
  fit_only_test = rec.scores['test_fit_only' if refit else 'test']
  acc, mse = _score(kt / scale @ best[3], yt)
  assert fit_only_test['acc'] == acc and fit_only_test['mse'] == pytest.approx(mse, rel=1e-6)
  if not refit:
    assert set(rec.scores) == {'train', 'val', 'test'} and rec.refit_alpha is None
    return
  # Refit: the chosen ridge on the kernel over fit + val (same scale: max of the fit block).
  assert set(rec.scores) == {'train', 'val', 'test', 'test_fit_only'}
  x_tr = np.concatenate([xf, xv])
  want = np.linalg.solve(_ntk(x_tr) / scale + rec.ridge * np.eye(len(x_tr)),
                         np.eye(3)[np.concatenate([yf, yv])])
  assert rec.refit_alpha.shape == (20, 3) and rec.refit_jitter == 0.0
  tolerances.assert_rel_fro(rec.refit_alpha, want, 1e-6, 'refit alpha')
  pred = _ntk(xt, x_tr) / scale @ want
  acc, mse = _score(pred, yt)
  assert rec.scores['test']['acc'] == acc
  assert rec.scores['test']['mse'] == pytest.approx(mse, rel=1e-6)
  tolerances.assert_rel_fro(crfm.convrfm_predict(state, xt), pred, 1e-6, 'refit predictions')
  tolerances.assert_rel_fro(crfm.convrfm_predict(state, xt, fit_only=True),
                            kt / scale @ best[3], 1e-6, 'fit-only predictions')


def test_refit_with_a_learned_metric_matches_a_direct_solve():
  x, y = _data(12, 20)
  xt, yt = _data(13, 6)
  state = crfm.convrfm_fit(x, y, config=CFG, x_test=xt, y_test=yt)
  x_tr = np.concatenate([np.asarray(state.x_fit), np.asarray(state.x_val)])
  y_tr = np.concatenate([state.y_fit, state.y_val])
  rec = state.history[1]
  assert not np.allclose(rec.metric, np.eye(9))
  want = np.linalg.solve(_ntk(x_tr, metric=rec.metric) / rec.kernel_scale
                         + rec.ridge * np.eye(20), np.eye(3)[y_tr])
  tolerances.assert_rel_fro(rec.refit_alpha, want, 1e-6, 'refit alpha (round 1)')
  pred = _ntk(xt, x_tr, metric=rec.metric) / rec.kernel_scale @ want
  tolerances.assert_rel_fro(crfm.convrfm_predict(state, xt, record=rec), pred, 1e-6)
  assert rec.scores['test']['acc'] == _score(pred, yt)[0]
  # The scale is still max K over the fit block alone.
  assert math.isclose(rec.kernel_scale, _ntk(state.x_fit, metric=rec.metric).max(),
                      rel_tol=1e-10)


def test_refit_false_reproduces_the_fit_only_run():
  x, y = _data(14, 20)
  xt, yt = _data(15, 6)
  on = crfm.convrfm_fit(x, y, config=CFG._replace(rounds=3), x_test=xt, y_test=yt)
  off = crfm.convrfm_fit(x, y, config=CFG._replace(rounds=3, refit=False), x_test=xt,
                         y_test=yt)
  assert not off.refits and on.refits
  for a, b in zip(on.history, off.history):
    assert b.refit_alpha is None and a.refit_alpha is not None
    assert a.ridge == b.ridge
    # Only the kernel tiling differs (fit block sliced from the fit + val matrix), which
    # changes float64 rounding of the kernel entries. The AGOP amplifies rounding: here
    # v = u + 2 coef p cancels, and perturbing alpha by one ulp (relative 1e-16) moves the
    # AGOP by 0.9-1.6e-10 (measured, any perturbation up to 1e-14), so metrics agree to about
    # 1e-10 and later alphas to about 1e-10 times the ridge system's condition (~10).
    tolerances.assert_rel_fro(a.alpha, b.alpha, 1e-9, 'alpha')
    tolerances.assert_rel_fro(a.metric, b.metric, 1e-9, 'metric')
    if b.next_metric is not None:
      tolerances.assert_rel_fro(a.next_metric, b.next_metric, 1e-9, 'next metric')
    for split in ('train', 'val'):
      assert a.scores[split] == pytest.approx(b.scores[split], rel=1e-9)
    assert a.scores['test_fit_only'] == pytest.approx(b.scores['test'], rel=1e-9)
  assert crfm.best_round(on).round == crfm.best_round(off).round
  tolerances.assert_rel_fro(crfm.convrfm_predict(off, xt),
                            crfm.convrfm_predict(on, xt, fit_only=True), 1e-10)


def test_validation_labels_do_not_shape_the_metric():
  # Explicit validation images with two different labelings. With a single ridge nothing is
  # selected, so the fit-only predictor, its AGOP and the next metric must be bitwise the
  # same; the refit predictor, fitted on the validation labels too, must change. (With a
  # ridge grid the labels choose the ridge, as they choose the round: that is selection.)
  x, y = _data(16, 16)
  xv, yv = _data(17, 6)
  xt, yt = _data(18, 4)
  cfg = CFG._replace(ridges=(1e-3,))
  runs = [crfm.convrfm_step(crfm.convrfm_init(x, y, config=cfg, x_val=xv, y_val=labels,
                                              x_test=xt, y_test=yt, num_classes=3))
          for labels in (yv, (yv + 1) % 3)]
  a, b = (r.history[0] for r in runs)
  np.testing.assert_array_equal(a.alpha, b.alpha)
  np.testing.assert_array_equal(a.agop, b.agop)
  np.testing.assert_array_equal(a.next_metric, b.next_metric)
  np.testing.assert_array_equal(runs[0].next_metric, runs[1].next_metric)
  assert a.scores['test_fit_only'] == b.scores['test_fit_only']
  assert tolerances.rel_fro(a.refit_alpha, b.refit_alpha) > 0.1
  assert tolerances.rel_fro(crfm.convrfm_predict(runs[0], xt),
                            crfm.convrfm_predict(runs[1], xt)) > 1e-3


def test_metric_update_matches_generic_patch_agop():
  x, y = _data(2, 16)
  state = crfm.convrfm_step(crfm.convrfm_init(x, y, config=CFG))
  rec = state.history[0]
  xf = state.x_fit
  # Reference AGOP: jconvrfm.patch_agop (autodiff through explicit patches) of the predictor.
  pf = patches_lib.patches(xf, 3)
  gram_fn = crfm._gram_kernel(2, 3, jconvrfm.Padding.VALID, 1, fused.Kind.NTK)

  def predictor(pz, pf, alpha):
    gram = jnp.einsum('mhwd,hwd->mhw', pf, pz)
    sq = jnp.sum(pf * pf, -1)
    # The sample is a training image: its own Gram entry equals its squared norm exactly (in
    # value; ConvRFM's fast AGOP does the same, see predictor_agop).
    own = jnp.all(pf == pz[None], axis=(1, 2, 3))[:, None, None]
    gram = gram + jax.lax.stop_gradient(jnp.where(own, sq - gram, 0))
    k = gram_fn(gram[:, None], sq, jnp.sum(pz * pz, -1)[None])[:, 0]
    return alpha.T @ k

  g = jconvrfm.patch_agop(predictor, pf, pf, rec.alpha / rec.kernel_scale)
  tolerances.assert_rel_fro(rec.agop, g, 1e-6, 'AGOP')
  s = np.array(jconvrfm.sqrt_psd(g))
  s /= np.linalg.norm(s)
  tolerances.assert_rel_fro(state.next_metric, s @ s, 1e-6, 'next metric')
  assert math.isclose(float(jnp.trace(state.next_metric)), 1.0, rel_tol=1e-9)  # ||S||_F = 1


def test_stax_kernel_gives_the_same_run_as_the_fused_cntk():
  x, y = _data(4, 16)
  fused_state = crfm.convrfm_fit(x, y, config=CFG)
  _, _, kernel_fn = nt.cntk_stax(2, 3, jconvrfm.Padding.VALID)
  stax_state = crfm.convrfm_fit(x, y, config=CFG, stax_kernel_fn=kernel_fn)
  # neural-tangents' depth-2 CNTK itself differs from the closed form by ~3e-6 (relative) in
  # float64, so the two runs can only agree to that level.
  for a, b in zip(fused_state.history, stax_state.history):
    assert a.ridge == b.ridge
    for split in a.scores:
      assert a.scores[split] == pytest.approx(b.scores[split], rel=1e-4)
    tolerances.assert_rel_fro(a.metric, b.metric, 1e-4, 'metric')
    tolerances.assert_rel_fro(a.alpha, b.alpha, 1e-4, 'alpha')
    tolerances.assert_rel_fro(a.refit_alpha, b.refit_alpha, 1e-4, 'refit alpha')
  tolerances.assert_rel_fro(fused_state.history[0].agop, stax_state.history[0].agop, 1e-4,
                            'AGOP')


def test_steps_resume_and_predict():
  x, y = _data(5, 16)
  xt, yt = _data(6, 6)
  full = crfm.convrfm_fit(x, y, config=CFG._replace(rounds=3), x_test=xt, y_test=yt)
  # Resume: a fresh init with round 1's metric restored continues identically.
  resumed = crfm.convrfm_init(x, y, config=CFG._replace(rounds=3), x_test=xt, y_test=yt)
  resumed = resumed._replace(history=full.history[:1], next_metric=full.history[1].metric)
  resumed = crfm.convrfm_step(crfm.convrfm_step(resumed))
  for a, b in zip(full.history, resumed.history):
    tolerances.assert_rel_fro(b.metric, a.metric, 1e-12)
    assert a.scores == b.scores
  assert full.history[-1].next_metric is None  # no AGOP after the last round
  with pytest.raises(ValueError, match='finished all 3 rounds'):
    crfm.convrfm_step(full)
  best = crfm.best_round(full)
  pred = crfm.convrfm_predict(full, xt)
  assert pred.shape == (6, 3)
  acc = float(np.mean(np.asarray(pred).argmax(1) == yt))
  assert acc == best.scores['test']['acc']


def test_rounds_share_one_compiled_tile_program(caplog):
  # Round 0 (M = I) and round 1 (learned M) must run the same compiled kernel programs: the
  # metric is a traced argument, never a reason to recompile. Fresh shapes (11 x 11 images)
  # so that no earlier test has compiled them.
  x, y = _data(30, 16, size=11)
  xt, yt = _data(31, 4, size=11)
  state = crfm.convrfm_init(x, y, config=CFG._replace(ridges=(1e-3,)), x_test=xt, y_test=yt)
  counts = []
  for _ in range(2):
    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
      state = crfm.convrfm_step(state)
    counts.append(sum('jit(per_device)' in r.getMessage() and 'Finished XLA compilation'
                      in r.getMessage() for r in caplog.records))
  assert counts[0] >= 1, 'round 0 compiled no tile program: the log format changed'
  assert counts[1] == 0, f'round 1 recompiled {counts[1]} tile program(s)'


def test_validation_split_is_seeded_and_disjoint():
  x, y = _data(7, 20)
  a = crfm.convrfm_init(x, y, config=CFG)
  b = crfm.convrfm_init(x, y, config=CFG)
  c = crfm.convrfm_init(x, y, config=CFG._replace(seed=4))
  assert a.x_fit.shape[0] == 15 and a.x_val.shape[0] == 5
  np.testing.assert_array_equal(a.x_val, b.x_val)
  assert not np.array_equal(a.x_val, c.x_val)
  rows = {tuple(r) for r in np.asarray(a.x_fit).reshape(15, -1)}
  assert not rows & {tuple(r) for r in np.asarray(a.x_val).reshape(5, -1)}


def test_select_on_test_uses_the_test_split():
  x, y = _data(8, 12)
  xt, yt = _data(9, 6)
  state = crfm.convrfm_fit(x, y, config=CFG._replace(select_on_test=True, rounds=1),
                           x_test=xt, y_test=yt)
  assert state.selection_split == 'test' and state.x_val is None
  assert state.x_fit.shape[0] == 12
  assert state.config.refit and not state.refits   # no refit with the reference protocol
  rec = state.history[0]
  assert rec.refit_alpha is None and 'test_fit_only' not in rec.scores
  assert max((r['test']['acc'], -r['test']['mse']) for r in rec.ridge_scores) == (
      rec.scores['test']['acc'], -rec.scores['test']['mse'])
  with pytest.raises(ValueError, match='needs `x_test`'):
    crfm.convrfm_init(x, y, config=CFG._replace(select_on_test=True))


def test_float32_dtype_is_kept():
  x, y = _data(10, 12)
  state = crfm.convrfm_fit(x, y, config=CFG._replace(dtype='float32', rounds=2))
  assert state.x_fit.dtype == jnp.float32
  assert state.history[1].metric.dtype == jnp.float32
  assert state.history[0].alpha.dtype == jnp.float32
  assert state.history[0].refit_alpha.dtype == jnp.float32


@pytest.mark.parametrize('change,match', [
    (dict(y=np.full(12, 5)), r'labels must lie in \[0, 3\)'),
    (dict(y=np.zeros(11, np.int32)), '11 labels'),
    (dict(y=-np.ones(12, np.int32)), 'labels must lie'),
    (dict(x=np.full((12, 7, 7, 1), np.nan)), 'NaN'),
    (dict(x=np.zeros((0, 7, 7, 1)), y=np.zeros(0, np.int32)), 'empty'),
    (dict(x=np.zeros((12, 7, 7))), 'rank 4'),
    (dict(config=CFG._replace(val_fraction=0.0)), 'No selection split'),
    (dict(config=CFG._replace(ridges=())), 'ridges'),
    (dict(config=CFG._replace(normalize='mean')), 'normalize'),
    (dict(config=CFG._replace(padding='FULL')), 'padding'),
    (dict(config=CFG._replace(keep_fraction=0.0)), 'keep_fraction'),
    (dict(config=CFG._replace(refit='yes')), 'config.refit'),
])
def test_bad_input(change, match):
  x, y = _data(11, 12)
  args = dict(x=x, y=y, config=CFG)
  args.update(change)
  with pytest.raises(ValueError, match=match):
    crfm.convrfm_init(args['x'], args['y'], config=args['config'], num_classes=3)


def test_metric_from_agop_options():
  rng = np.random.default_rng(0)
  f = rng.normal(size=(4, 4))
  g = f @ f.T
  e, u = np.linalg.eigh(g)
  m = crfm.metric_from_agop(jnp.asarray(g))
  tolerances.assert_rel_fro(m, g / np.linalg.norm((u * np.sqrt(e)) @ u.T)**2, 1e-10)
  m1 = crfm.metric_from_agop(jnp.asarray(g), power=1.0, keep_fraction=0.25)
  s = e[-1] * np.outer(u[:, -1], u[:, -1])
  s /= np.linalg.norm(s)
  tolerances.assert_rel_fro(m1, s @ s, 1e-10)
  with pytest.raises(ValueError, match='AGOP is zero'):
    crfm.metric_from_agop(jnp.zeros((3, 3)))


def test_docstring_examples_run():
  import doctest  # pylint: disable=g-import-not-at-top
  assert doctest.testmod(crfm).failed == 0
