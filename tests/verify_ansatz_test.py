"""Smoke tests of experiments/verify_ansatz.py (tiny in-memory data; MNIST subset if present)."""

import dataclasses
import json

import numpy as np
import pytest

from experiments import verify_ansatz
from jconvrfm import data


def _tiny(n, seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, n).astype(np.int32)
  images = rng.uniform(0, 0.2, (n, 8, 8, 1)).astype(np.float32)
  for i, y in enumerate(labels):  # class = which third of the image is bright
    images[i, :, 1 + 2 * y:3 + 2 * y] += 0.8
  return data.Dataset(images, labels, 3)


def test_end_to_end_tiny(tmp_path):
  config = verify_ansatz.Config(model='vanilla', width=4, depth=2, init_scale=0.05, epochs=3,
                                batch_size=8, learning_rate=1e-2, agop_images=16,
                                chunk_size=8, generic_check=True)
  res = verify_ansatz.run(config, tmp_path, train_data=_tiny(32, 0), test_data=_tiny(16, 1),
                          progress=False)
  for name in ('config.json', 'metrics.jsonl', 'cnfa.json', 'cnfa.md', 'cnfa.png',
               'results.json'):
    assert (tmp_path / name).is_file(), name
  assert json.loads((tmp_path / 'config.json').read_text())['width'] == 4
  assert len((tmp_path / 'metrics.jsonl').read_text().splitlines()) == 3
  layers = json.loads((tmp_path / 'cnfa.json').read_text())
  assert [l['name'] for l in layers] == ['conv_0', 'conv_1']
  for l in layers:
    for key in ('corr_agop', 'cos_agop', 'corr_sqrt_agop', 'cos_sqrt_agop', 'init_corr_agop',
                'init_cos_agop', 'baseline_corr', 'baseline_cos'):
      assert -1.0 <= l[key] <= 1.0, key
    assert l['generic_rel_error'] < 1e-4  # float32 run
  assert res['n_agop'] == 16 and res['steps'] == 12
  assert 0.0 <= res['test_accuracy'] <= 1.0


def test_unknown_model(tmp_path):
  with pytest.raises(ValueError, match='model'):
    verify_ansatz.run(verify_ansatz.Config(model='lenet'), tmp_path / 'run',
                      train_data=_tiny(8, 0), test_data=_tiny(8, 1), progress=False)
  assert not (tmp_path / 'run').exists()


def test_two_devices_train_data_parallel_and_match_one(tmp_path):
  config = verify_ansatz.Config(model='vanilla', width=4, depth=2, init_scale=0.05, epochs=2,
                                batch_size=8, learning_rate=1e-2, agop_images=8, chunk_size=8)
  runs = {}
  for k in (1, 2):
    runs[k] = verify_ansatz.run(dataclasses.replace(config, num_devices=k), tmp_path / str(k),
                                train_data=_tiny(32, 0), test_data=_tiny(16, 1),
                                progress=False)
    assert runs[k]['train_devices'] == k
  # The same global-batch steps on one or two devices (float32 rounding only).
  losses = [[json.loads(l)['train_loss'] for l in
             (tmp_path / str(k) / 'metrics.jsonl').read_text().splitlines()] for k in (1, 2)]
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)
  assert runs[2]['test_accuracy'] == runs[1]['test_accuracy']


@pytest.mark.parametrize('num_devices,batch_size,match', [
    (99, 8, r'`num_devices` must be in \[0, '),
    (-1, 8, r'`num_devices` must be in \[0, '),
    (2, 9, r'`batch_size` \(9\) must be a multiple of the number of devices \(2\)'),
])
def test_bad_devices_fail_before_the_workdir_is_made(tmp_path, num_devices, batch_size, match):
  config = verify_ansatz.Config(num_devices=num_devices, batch_size=batch_size)
  with pytest.raises(ValueError, match=match):
    verify_ansatz.run(config, tmp_path / 'run', train_data=_tiny(16, 0),
                      test_data=_tiny(8, 1), progress=False)
  assert not (tmp_path / 'run').exists()


def test_rerun_resumes_and_another_configuration_is_refused(tmp_path):
  config = verify_ansatz.Config(model='vanilla', width=4, depth=2, init_scale=0.05, epochs=2,
                                batch_size=8, learning_rate=1e-2, agop_images=8, chunk_size=4)
  data = dict(train_data=_tiny(32, 0), test_data=_tiny(16, 1), progress=False)
  first = verify_ansatz.run(config, tmp_path, **data)
  metrics = (tmp_path / 'metrics.jsonl').read_text()
  # Another device count may resume (checkpoints hold no device layout): no step is retaken.
  again = verify_ansatz.run(dataclasses.replace(config, num_devices=2), tmp_path, **data)
  assert (tmp_path / 'metrics.jsonl').read_text() == metrics
  assert again['steps'] == first['steps'] == 8
  assert again['test_accuracy'] == first['test_accuracy']
  assert json.loads((tmp_path / 'config.json').read_text())['num_devices'] == 0
  with pytest.raises(ValueError, match=r'different configuration \(differs in '
                     r"\['learning_rate'\]\)"):
    verify_ansatz.run(dataclasses.replace(config, learning_rate=0.1), tmp_path, **data)
  assert (tmp_path / 'metrics.jsonl').read_text() == metrics


def test_unknown_dataset_fails_before_the_workdir_is_made(tmp_path):
  with pytest.raises(ValueError, match='no_such_dataset'):
    verify_ansatz.run(verify_ansatz.Config(dataset='no_such_dataset'), tmp_path / 'run',
                      progress=False)
  assert not (tmp_path / 'run').exists()


def test_mnist_subset(tmp_path, mnist_dir, tfds_cache_dir):
  """The real MNIST path (tfds with the offline files) on a small subset."""
  config = verify_ansatz.Config(model='vanilla', width=8, depth=2, init_scale=0.005,
                                train_split='train[:256]', test_split='test[:128]',
                                manual_dir=str(mnist_dir), tfds_data_dir=str(tfds_cache_dir),
                                epochs=3, batch_size=32, learning_rate=3e-3, agop_images=32)
  res = verify_ansatz.run(config, tmp_path, progress=False)
  assert res['n_train'] == 256 and res['n_test'] == 128
  assert res['test_accuracy'] > 0.5  # 10 classes: well above chance after 24 steps
  layers = json.loads((tmp_path / 'cnfa.json').read_text())
  assert len(layers) == 2 and all(np.isfinite(l['corr_agop']) for l in layers)
