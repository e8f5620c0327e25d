"""Tests for the training loop: learning, exact resume, non-finite loss, checkpoints."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jconvrfm._src import train as train_lib
from jconvrfm.models import ResNet, VanillaCNN


def _problem(n=48, seed=0):
  x = jax.random.normal(jax.random.key(seed), (n, 8, 8, 1), jnp.float32)
  y = (x[:, :4].mean((1, 2, 3)) > x[:, 4:].mean((1, 2, 3))).astype(jnp.int32)
  return x, y


@pytest.mark.parametrize('optimizer,loss', [('adam', 'cross_entropy'), ('sgd', 'mse')])
def test_loss_decreases(optimizer, loss):
  x, y = _problem()
  lr = 3e-3 if optimizer == 'adam' else 0.05
  r = train_lib.train(VanillaCNN(2, width=8, depth=2), x, y, num_classes=2, epochs=6,
                      batch_size=8, optimizer=optimizer, learning_rate=lr, loss=loss,
                      progress=False)
  losses = [h['train_loss'] for h in r.history]
  assert losses[-1] < 0.8 * losses[0], losses
  assert int(r.state.step) == 6 * 6


def test_resume_equals_uninterrupted(tmp_path):
  x, y = _problem()
  model = ResNet(2, width=4, small_inputs=True, stage_sizes=(1, 1))  # has batch norm
  kw = dict(num_classes=2, epochs=3, batch_size=16, optimizer='sgd', learning_rate=0.05,
            seed=3, progress=False)
  full = train_lib.train(model, x, y, workdir=tmp_path / 'full', **kw)
  # Interrupt mid-epoch (step 4 of 9, checkpointed), then resume to the end.
  part = train_lib.train(model, x, y, workdir=tmp_path / 'part', max_steps=4, **kw)
  assert int(part.state.step) == 4
  assert train_lib.latest_checkpoint(tmp_path / 'part').endswith('checkpoint_4.msgpack')
  resumed = train_lib.train(model, x, y, workdir=tmp_path / 'part', **kw)
  assert int(resumed.state.step) == int(full.state.step) == 9
  for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert full.state.batch_stats  # batch statistics were trained and compared
  # Metrics: one record per epoch in both workdirs, equal losses for the last two epochs.
  rec_full = [json.loads(l) for l in (tmp_path / 'full' / 'metrics.jsonl').read_text().splitlines()]
  rec_part = [json.loads(l) for l in (tmp_path / 'part' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['epoch'] for r in rec_full] == [1, 2, 3]
  assert [r['epoch'] for r in rec_part] == [1, 2, 3]
  assert rec_full[-1]['train_loss'] == rec_part[-1]['train_loss']


def test_checkpoint_roundtrip_and_keep(tmp_path):
  x, y = _problem(16)
  model = VanillaCNN(2, width=4, depth=1)
  tx = train_lib.make_optimizer('adam', 1e-3)
  state = train_lib.init_state(model, tx, x, seed=0)
  for s in (1, 2, 3):
    train_lib.save_checkpoint(tmp_path, state._replace(step=jnp.asarray(s, jnp.int32)))
  files = sorted(p.name for p in train_lib.checkpoint_dir(tmp_path).iterdir())
  assert files == ['checkpoint_2.msgpack', 'checkpoint_3.msgpack']
  template = train_lib.init_state(model, tx, x, seed=1)
  restored = train_lib.restore_checkpoint(train_lib.latest_checkpoint(tmp_path), template)
  assert int(restored.step) == 3
  np.testing.assert_array_equal(restored.params['conv_0']['kernel'],
                                state.params['conv_0']['kernel'])


def test_nan_loss_raises():
  x, y = _problem(16)
  x = x.at[3, 0, 0, 0].set(jnp.inf)  # check_nhwc rejects this at the edge ...
  with pytest.raises(ValueError, match='images'):
    train_lib.train(VanillaCNN(2, width=4, depth=1), x, y, num_classes=2, epochs=1,
                    batch_size=8, progress=False)
  x, y = _problem(16)  # ... a diverging learning rate is caught in the loop.
  with pytest.raises(FloatingPointError, match='step'):
    train_lib.train(VanillaCNN(2, width=8, depth=2), x * 1e3, y, num_classes=2, epochs=50,
                    batch_size=8, optimizer='sgd', learning_rate=1e6, loss='mse',
                    progress=False)


def test_bad_arguments():
  x, y = _problem(16)
  model = VanillaCNN(2, width=4, depth=1)
  with pytest.raises(ValueError, match='loss'):
    train_lib.train(model, x, y, num_classes=2, epochs=1, batch_size=8, loss='hinge',
                    progress=False)
  with pytest.raises(ValueError, match='optimizer'):
    train_lib.train(model, x, y, num_classes=2, epochs=1, batch_size=8, optimizer='lbfgs',
                    progress=False)
  with pytest.raises(ValueError, match='labels'):
    train_lib.train(model, x, y + 5, num_classes=2, epochs=1, batch_size=8, progress=False)
  with pytest.raises(ValueError, match='batch_size'):
    train_lib.train(model, x, y, num_classes=2, epochs=1, batch_size=64, progress=False)


def test_evaluate_matches_direct_computation():
  x, y = _problem(20)
  model = VanillaCNN(2, width=4, depth=1)
  v = model.init(jax.random.key(0), x[:1])
  ev = train_lib.evaluate(model, v, x, y, num_classes=2, loss='mse', batch_size=7)
  logits = np.asarray(model.apply(v, x), np.float64)
  onehot = np.eye(2)[np.asarray(y)]
  assert ev['accuracy'] == pytest.approx(np.mean(logits.argmax(1) == np.asarray(y)))
  assert ev['loss'] == pytest.approx(np.mean((logits - onehot)**2), rel=1e-5)


@pytest.mark.parametrize('loss', ['mse', 'cross_entropy'])
def test_evaluate_split_over_devices_matches_one_device(loss):
  """20 images in batches of 7 over 4 devices: batches of 8, the last padded with 4 rows that
  must not count; against the direct float64 computation."""
  x, y = _problem(20)
  model = VanillaCNN(2, width=4, depth=1)
  v = model.init(jax.random.key(0), x[:1])
  logits = np.asarray(model.apply(v, x), np.float64)
  onehot = np.eye(2)[np.asarray(y)]
  if loss == 'mse':
    want = np.mean((logits - onehot)**2)
  else:
    shifted = logits - logits.max(1, keepdims=True)
    want = np.mean(np.log(np.exp(shifted).sum(1)) - (shifted * onehot).sum(1))
  for devices in (None, jax.devices()[:1], jax.devices()):
    ev = train_lib.evaluate(model, v, x, y, num_classes=2, loss=loss, batch_size=7,
                            devices=devices)
    assert ev['accuracy'] == np.mean(logits.argmax(1) == np.asarray(y))
    assert ev['loss'] == pytest.approx(want, rel=1e-5)


def test_evaluate_bad_arguments():
  x, y = _problem(8)
  model = VanillaCNN(2, width=4, depth=1)
  v = model.init(jax.random.key(0), x[:1])
  with pytest.raises(ValueError, match='`labels` must have shape'):
    train_lib.evaluate(model, v, x, y[:5], num_classes=2)
  with pytest.raises(ValueError, match='`loss` must be one of'):
    train_lib.evaluate(model, v, x, y, num_classes=2, loss='hinge')
  with pytest.raises(ValueError, match='batch_size'):
    train_lib.evaluate(model, v, x, y, num_classes=2, batch_size=0)


def test_data_parallel_over_two_devices_matches_one_device():
  x, y = _problem()
  model = ResNet(2, width=4, small_inputs=True, stage_sizes=(1, 1))  # has batch norm
  kw = dict(num_classes=2, epochs=3, batch_size=16, optimizer='sgd', learning_rate=0.05,
            seed=3, progress=False)
  one = train_lib.train(model, x, y, devices=jax.devices()[:1], **kw)
  two = train_lib.train(model, x, y, devices=jax.devices()[:2], **kw)
  # The state lives on both devices, replicated.
  for leaf in jax.tree.leaves(two.state):
    assert leaf.sharding.device_set == set(jax.devices()[:2])
    assert leaf.sharding.is_fully_replicated
  # The same global-batch steps (batch norm over the whole batch): float32 rounding only.
  # Measured: losses 5e-8 relative, state entries 2.5e-7 absolute after 9 steps; another
  # seed moves the parameters by 1.3.
  np.testing.assert_allclose([h['train_loss'] for h in two.history],
                             [h['train_loss'] for h in one.history], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(two.state), jax.tree.leaves(one.state)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-6)
  # Evaluation reads the replicated state.
  ev = train_lib.evaluate(model, two.state.variables, x, y, num_classes=2)
  assert ev == pytest.approx(train_lib.evaluate(model, one.state.variables, x, y,
                                                num_classes=2), rel=1e-5)


def test_data_parallel_batch_must_split_evenly():
  x, y = _problem(16)
  with pytest.raises(ValueError, match=r'`batch_size` \(9\) must be a multiple of the number '
                     r'of devices \(2\)'):
    train_lib.train(VanillaCNN(2, width=4, depth=1), x, y, num_classes=2, epochs=1,
                    batch_size=9, progress=False, devices=jax.devices()[:2])
  with pytest.raises(ValueError, match='must not repeat'):
    train_lib.train(VanillaCNN(2, width=4, depth=1), x, y, num_classes=2, epochs=1,
                    batch_size=8, progress=False, devices=jax.devices()[:1] * 2)
