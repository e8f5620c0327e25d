"""Tests for the per-layer CNFA report: closed form vs generic AGOP on every reference model."""

import flax
import jax
import jax.numpy as jnp
import pytest

import jconvrfm
from jconvrfm import models
from jconvrfm._src import cnfa_report as report_lib
from tests import tolerances


def _f64_variables(model, x, seed=1):
  v = model.init(jax.random.key(seed), x)
  v = {k: a for k, a in v.items() if k != 'perturbations'}
  v = jax.tree.map(lambda a: a.astype(jnp.float64), v)
  if 'batch_stats' in v:  # non-trivial running statistics, as after training
    flat = flax.traverse_util.flatten_dict(v['batch_stats'])
    keys = jax.random.split(jax.random.key(seed + 7), len(flat))
    flat = {k: (a + 0.1 * jax.random.normal(key, a.shape, a.dtype) if k[-1] == 'mean' else
                a * jax.random.uniform(key, a.shape, a.dtype, 0.5, 1.5))
            for key, (k, a) in zip(keys, flat.items())}
    v['batch_stats'] = flax.traverse_util.unflatten_dict(flat)
  return v


# One small instance of every reference model; the layer lists include strided and padded convs
# (VGG/ResNet: padding 1; ResNet layer2_0/conv1: stride 2; AlexNet features_0: 11x11, stride 4,
# padding 2, and features_3: 5x5, padding 2).
CASES = {
    'vanilla': (lambda: models.VanillaCNN(3, width=4, depth=2), (12, 12, 1), None),
    'myrtle5': (lambda: models.Myrtle(3, width=4, depth=5), (8, 8, 2), None),
    # VGG-11 layout (configuration "A" layer indices) at reduced widths.
    'vgg11_bn': (lambda: models.VGG(3, cfg=(4, 'M', 4, 'M', 8, 8, 'M', 8, 8, 'M', 8, 8, 'M'),
                                    batch_norm=True, hidden=8, pool_size=(1, 1)),
                 (32, 32, 3), ('features_0', 'features_4', 'features_25')),
    'resnet18_block': (lambda: models.ResNet(3, stage_sizes=(1, 1), width=4, small_inputs=True),
                       (8, 8, 3), None),
    'alexnet': (lambda: models.AlexNet(3, widths=(4, 4, 4, 4, 4), hidden=8, pool_size=(1, 1)),
                (64, 64, 3), ('features_0', 'features_3', 'features_10')),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_closed_form_equals_generic(case):
  make, shape, names = CASES[case]
  model = make()
  x = jax.random.uniform(jax.random.key(0), (2, *shape), jnp.float64)
  v = _f64_variables(model, x)
  closed = report_lib.layer_agops(model, v, x, chunk_size=1, layer_names=names)
  generic = report_lib.layer_agops(model, v, x, chunk_size=1, layer_names=names, generic=True)
  assert set(closed) == set(generic) and closed
  if case == 'resnet18_block':
    assert set(closed) == {'layer1_0/conv1', 'layer2_0/conv1'}
  for name in closed:
    assert closed[name].dtype == jnp.float64
    assert float(jnp.linalg.norm(closed[name])) > 0
    tolerances.assert_rel_fro(generic[name], closed[name], 1e-6, f'{case} {name}')


def test_against_patch_agop_of_handwritten_network():
  """Depth-1 vanilla CNN: f(x) = R^T vec(relu(P(x) W)); the report's AGOP equals
  `jconvrfm.patch_agop` of that function written by hand on `jconvrfm.patches`."""
  model = models.VanillaCNN(4, width=5, depth=1, padding='SAME')
  x = jax.random.normal(jax.random.key(0), (5, 6, 6, 2), jnp.float64)
  v = _f64_variables(model, x)
  w = v['params']['conv_0']['kernel'].reshape(-1, 5)
  r = v['params']['readout']['kernel']
  fn = lambda p, w, r: jax.nn.relu(p @ w).reshape(-1) @ r  # p: (H', W', d) -> (4,)
  want = jconvrfm.patch_agop(fn, jconvrfm.patches(x, 3, padding='SAME'), w, r)
  got = report_lib.layer_agops(model, v, x, chunk_size=3)['conv_0']
  tolerances.assert_rel_fro(got, want, 1e-12, 'report vs patch_agop')


def test_chunking_and_output_additivity():
  model = models.VanillaCNN(3, width=4, depth=2)
  x = jax.random.normal(jax.random.key(0), (5, 6, 6, 1), jnp.float64)
  v = _f64_variables(model, x)
  whole = report_lib.layer_agops(model, v, x, chunk_size=5)
  ones = report_lib.layer_agops(model, v, x, chunk_size=1)
  parts = [report_lib.layer_agops(model, v, x, chunk_size=2, outputs=[o]) for o in range(3)]
  for name in whole:
    tolerances.assert_rel_fro(ones[name], whole[name], 1e-12, f'chunk 1 {name}')
    tolerances.assert_rel_fro(sum(p[name] for p in parts), whole[name], 1e-12,
                              f'sum over outputs {name}')


def test_report_fields_and_json():
  model = models.VanillaCNN(3, width=4, depth=2)
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 1), jnp.float64)
  v0 = _f64_variables(model, x, seed=1)
  v1 = _f64_variables(model, x, seed=2)
  recs = report_lib.cnfa_report(model, v1, x, initial_variables=v0, generic=True)
  assert [r.name for r in recs] == ['conv_0', 'conv_1']
  agops = report_lib.layer_agops(model, v1, x)
  for r in recs:
    m = jconvrfm.cnfm(v1['params'][r.name]['kernel'])
    m0 = jconvrfm.cnfm(v0['params'][r.name]['kernel'])
    g = agops[r.name]
    assert r.corr_agop == pytest.approx(float(jconvrfm.correlation(m, g)), abs=1e-12)
    assert r.cos_agop == pytest.approx(float(jconvrfm.correlation(m, g, centered=False)),
                                       abs=1e-12)
    assert r.corr_sqrt_agop == pytest.approx(
        float(jconvrfm.correlation(m, jconvrfm.sqrt_psd(g))), abs=1e-12)
    assert r.baseline_corr == pytest.approx(float(jconvrfm.correlation(m0, m)), abs=1e-12)
    assert r.generic_rel_error < 1e-10
    assert r.init_corr_agop is not None
  same = report_lib.cnfa_report(model, v1, x, initial_variables=v1)
  assert all(r.baseline_corr == pytest.approx(1.0) for r in same)
  assert all(r.init_corr_agop == pytest.approx(r.corr_agop) for r in same)
  assert report_lib.from_json(report_lib.to_json(recs)) == recs
  assert report_lib.markdown_table(recs).count('\n') == 3


def test_bad_layer_name():
  model = models.VanillaCNN(3, width=4, depth=1)
  x = jnp.ones((2, 6, 6, 1))
  v = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='layer_names'):
    report_lib.layer_agops(model, v, x, layer_names=['conv_9'])


def test_second_call_does_not_recompile():
  model = models.VanillaCNN(3, width=4, depth=1)
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 1), jnp.float64)
  v0, v1 = _f64_variables(model, x, seed=1), _f64_variables(model, x, seed=2)
  report_lib.layer_agops(model, v0, x, chunk_size=4)
  fn = report_lib._chunk_agops_fn(model.clone(generic=False), False, ('conv_0',), None)
  assert fn._cache_size() == 1
  report_lib.layer_agops(models.VanillaCNN(3, width=4, depth=1), v1, x, chunk_size=4)
  assert fn._cache_size() == 1


def test_dead_network_gives_none_not_error():
  """A zero readout makes every AGOP zero: correlations are undefined and reported as None."""
  model = models.VanillaCNN(3, width=4, depth=2)
  x = jax.random.normal(jax.random.key(0), (3, 6, 6, 1), jnp.float64)
  v = _f64_variables(model, x)
  v['params']['readout']['kernel'] = jnp.zeros_like(v['params']['readout']['kernel'])
  recs = report_lib.cnfa_report(model, v, x, initial_variables=_f64_variables(model, x, 2))
  for r in recs:
    assert r.corr_agop is None and r.cos_agop is None and r.corr_sqrt_agop is None
    assert r.baseline_corr is not None  # the CNFMs themselves are fine
  assert '| - (-) |' in report_lib.markdown_table(recs)
  assert report_lib.from_json(report_lib.to_json(recs)) == recs
