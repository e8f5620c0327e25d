"""Tests for the Flax reference models and their analysable convolutions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jconvrfm import models
from jconvrfm._src.models import layers
from tests.tolerances import assert_rel_fro


def _strip(v):
  return {k: x for k, x in v.items() if k != 'perturbations'}


@pytest.mark.parametrize('padding,strides', [
    ('VALID', 1), ('SAME', 1), ('SAME', 2), (1, 1), (2, 4), (((0, 2), (1, 0)), 2),
    ('CIRCULAR', 1)])
def test_analysable_conv_matches_flax_conv_and_generic(padding, strides):
  x = jax.random.normal(jax.random.key(0), (2, 11, 11, 3), jnp.float64)
  q = 5 if strides == 4 else 3
  conv = layers.AnalysableConv(4, q, strides=strides, padding=padding)
  v = conv.init(jax.random.key(1), x)
  y = conv.apply(_strip(v), x)
  # Independent reference: flax.linen.Conv with the same kernel and bias.
  ref_pad = (padding if isinstance(padding, str) else
             ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding)
  ref = nn.Conv(4, (q, q), strides=strides, padding=ref_pad)
  y_ref = ref.apply({'params': _strip(v)['params']}, x)
  assert y.shape == y_ref.shape and y.dtype == jnp.float64
  assert_rel_fro(y, y_ref, 1e-12, 'conv vs flax Conv')
  y_gen = conv.clone(generic=True).apply(_strip(v), x)
  assert_rel_fro(y_gen, y_ref, 1e-12, 'generic patches @ W vs flax Conv')


def test_conv_keeps_float32():
  x = jnp.ones((1, 6, 6, 2), jnp.float32)
  conv = layers.AnalysableConv(3, 3)
  v = conv.init(jax.random.key(0), x)
  assert conv.apply(_strip(v), x).dtype == jnp.float32
  assert conv.clone(generic=True).apply(_strip(v), x).dtype == jnp.float32


def test_bad_padding():
  with pytest.raises(ValueError, match='padding'):
    layers.explicit_padding('FULL', (5, 5), (3, 3), (1, 1))
  with pytest.raises(ValueError, match='padding'):
    layers.explicit_padding(-1, (5, 5), (3, 3), (1, 1))


def test_adaptive_avg_pool_matches_torch_formula():
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 3), jnp.float64)
  out = models.adaptive_avg_pool(x, (3, 4))
  xn = np.asarray(x)
  ref = np.zeros((2, 3, 4, 3))
  for i in range(3):
    for j in range(4):
      h0, h1 = (i * 5) // 3, -(-((i + 1) * 5) // 3)
      w0, w1 = (j * 7) // 4, -(-((j + 1) * 7) // 4)
      ref[:, i, j] = xn[:, h0:h1, w0:w1].mean((1, 2))
  np.testing.assert_allclose(out, ref, rtol=1e-12)
  # 1x1 -> 7x7 replicates (what VGG's classifier sees for 32x32 inputs).
  y = models.adaptive_avg_pool(x[:, :1, :1], (7, 7))
  np.testing.assert_allclose(y, jnp.broadcast_to(x[:, :1, :1], (2, 7, 7, 3)))


# Parameter counts of torchvision's models (the numbers torchvision documents).
@pytest.mark.parametrize('make,count', [
    (lambda: models.vgg11(), 132_863_336),
    (lambda: models.vgg11(batch_norm=True), 132_868_840),
    (lambda: models.resnet18(), 11_689_512),
    (lambda: models.AlexNet(), 61_100_840),
])
def test_imagenet_models_shapes_and_parameter_counts(make, count):
  model = make()
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v['params']))
  assert n_params == count
  out = jax.eval_shape(lambda v, x: model.apply(_strip(v), x), v, x)
  assert out.shape == (2, 1000)


@pytest.mark.parametrize('make,shape,expected', [
    (lambda: models.VanillaCNN(10, width=8, depth=3), (28, 28, 1),
     ('conv_0', 'conv_1', 'conv_2')),
    (lambda: models.Myrtle(10, width=8, depth=5), (28, 28, 1),
     ('conv_0', 'conv_1', 'conv_2', 'conv_3')),
    (lambda: models.Myrtle(10, width=8, depth=7), (32, 32, 3),
     tuple(f'conv_{i}' for i in range(6))),
    (lambda: models.Myrtle(10, width=8, depth=10), (32, 32, 3),
     tuple(f'conv_{i}' for i in range(9))),
    (lambda: models.VGG(10, cfg=(8, 'M', 8, 'M', 8, 8, 'M', 8, 8, 'M', 8, 8, 'M'),
                        hidden=16), (32, 32, 3),
     tuple(f'features_{i}' for i in (0, 3, 6, 8, 11, 13, 16, 18))),
    (lambda: models.resnet18(10, width=4, small_inputs=True), (32, 32, 3),
     tuple(f'layer{s}_{b}/conv1' for s in range(1, 5) for b in range(2))),
    (lambda: models.AlexNet(10, widths=(4,) * 5, hidden=8), (64, 64, 3),
     tuple(f'features_{i}' for i in (0, 3, 6, 8, 10))),
])
def test_analysed_layers_and_logit_gradients(make, shape, expected):
  model = make()
  x = jax.random.uniform(jax.random.key(0), (2, *shape), jnp.float32)
  v = jax.eval_shape(lambda x: _strip(model.init(jax.random.key(1), x)), x)
  assert jax.eval_shape(lambda v, x: model.apply(v, x), v, x).shape == (2, 10)
  assert models.analysed_layers(model, v, x) == expected
  # Shapes only (traced, not compiled); values are tested in cnfa_report_test.py.
  grads = jax.eval_shape(lambda v, x: models.logit_gradients(model, v, x, outputs=[0, 3]), v, x)
  assert set(grads) == set(expected)
  for name, g in grads.items():
    k = models.layer_kernel(v['params'], name).shape[-1]
    assert g.shape[:2] == (2, 2) and g.shape[-1] == k


def test_preact_gradient_against_manual_network():
  """Per-example logit gradients w.r.t. the pre-activations of a 2-layer vanilla CNN, compared
  with jax.jacrev of the same network written by hand with lax.conv."""
  model = models.VanillaCNN(3, width=4, depth=2, padding='VALID')
  x = jax.random.normal(jax.random.key(0), (3, 7, 7, 2), jnp.float64)
  v = jax.tree.map(lambda a: a.astype(jnp.float64), _strip(model.init(jax.random.key(1), x)))
  p = v['params']
  conv = lambda h, w: jax.lax.conv_general_dilated(h, w, (1, 1), 'VALID',
                                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  def net_from_z1(z1, xi):  # logits of one example given its layer-1 pre-activation
    h = jax.nn.relu(z1)[None]
    return jax.nn.relu(conv(h, p['conv_1']['kernel'])).reshape(-1) @ p['readout']['kernel']

  grads = models.logit_gradients(model, v, x)
  for i in range(3):
    z1 = conv(x[i:i + 1], p['conv_0']['kernel'])[0]
    jac = jax.jacrev(net_from_z1)(z1, x[i])  # (3, H', W', k)
    assert_rel_fro(grads['conv_0'][i], jac, 1e-12, f'conv_0 example {i}')
    z2 = conv(jax.nn.relu(z1)[None], p['conv_1']['kernel'])[0]
    jac2 = jax.jacrev(lambda z: jax.nn.relu(z).reshape(-1) @ p['readout']['kernel'])(z2)
    assert_rel_fro(grads['conv_1'][i], jac2, 1e-12, f'conv_1 example {i}')


def test_resnet_skip_path_not_in_patch_gradient():
  """The analysed patches of a block's conv1 feed only the residual branch: zeroing conv1's
  kernel leaves the gradient w.r.t. those patches zero, while the block input still matters."""
  model = models.ResNet(2, width=4, stage_sizes=(1,), small_inputs=True, generic=True)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3), jnp.float64)
  v = jax.tree.map(lambda a: a.astype(jnp.float64), _strip(model.init(jax.random.key(1), x)))
  v['params']['layer1_0']['conv1']['kernel'] = jnp.zeros_like(
      v['params']['layer1_0']['conv1']['kernel'])
  g = models.logit_gradients(model, v, x, kind='patches')['layer1_0/conv1']
  assert float(jnp.max(jnp.abs(g))) == 0.0
