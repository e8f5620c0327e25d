r"""Train a reference CNN and check the Convolutional Neural Feature Ansatz layer by layer.

Trains one of the Flax reference models (`jconvrfm.models`), evaluates it, and writes to
`--workdir`:

* `config.json`: the flags;
* `metrics.jsonl`: one JSON record per epoch (train loss, accuracy and loss on the first
  `--epoch_eval_images` test images);
* `checkpoints/`: params, batch stats, optimizer state (a rerun resumes from the latest);
* `cnfa.json`: per analysed conv layer, centered (Pearson) and uncentered correlations of the
  trained CNFM `W W^T` with the patch AGOP `G` and with `G^(1/2)`, the same at initialisation,
  and the baseline corr(initial CNFM, trained CNFM) (`jconvrfm.cnfa_report`);
* `cnfa.md`: the same as a markdown table; `results.json`: accuracies and timings;
* `cnfa.png`: bar chart per layer, trained corr(CNFM, G) and corr(CNFM, G^(1/2)) vs baseline.

The paper's MNIST setting (4 conv layers of width 64, small init N(0, 0.005^2), 2,000 training
images); on a shared 2-core CPU training took 11 minutes and the report (500 images, trained and
initial weights) 1.4 minutes, test accuracy 0.948:

  python -m experiments.verify_ansatz --workdir=/tmp/cnfa_mnist --model=vanilla \
    --dataset=mnist --train_split='train[:2000]' --test_split=test \
    --manual_dir=../shared/data/mnist --tfds_data_dir=/tmp/tfds --init_scale=0.005 \
    --optimizer=adam --learning_rate=1e-3 --loss=cross_entropy --epochs=10

On several local accelerators (a TPU VM's chips, a multi-GPU host) every batch is split over
all of them (data parallel, `jconvrfm._src.train`); `--num_devices=N` takes the first N, and
`--batch_size` must be a multiple of their number. On a TPU pod slice start the same command
on every host with `--distributed` (`experiments/multihost.py`): batches are then split over
the chips of every host (each host loads the same data and fills its own chips' slices), the
CNFA report's AGOP chunks are shared out among the hosts, and process 0 alone writes (and,
for a resume, reads) the workdir.

Myrtle-5 on the CIFAR-10 JPEG test images split 80/20 with a fixed seed:

  python -m experiments.verify_ansatz --workdir=/tmp/cnfa_cifar --model=myrtle5 --width=32 \
    --dataset=folder:../shared/data/cifar10_jpeg --train_split=test --holdout_fraction=0.2

References:
  D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
  convolutional neural networks. arXiv:2309.00570, 2023.
"""

import dataclasses
import json
import time
from typing import Any, Callable, Dict, List, Optional

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import numpy as np

import experiments
from experiments import multihost
from jconvrfm import models
from jconvrfm._src import cnfa_report as report_lib
from jconvrfm._src import processes
from jconvrfm._src import train as train_lib

MODELS: Dict[str, Callable[..., nn.Module]] = {
    'vanilla': lambda nc, width, depth, init: models.VanillaCNN(
        nc, width=width, depth=depth, kernel_init=init),
    'myrtle5': lambda nc, width, depth, init: models.Myrtle(nc, width=width, depth=5,
                                                            kernel_init=init),
    'myrtle7': lambda nc, width, depth, init: models.Myrtle(nc, width=width, depth=7,
                                                            kernel_init=init),
    'myrtle10': lambda nc, width, depth, init: models.Myrtle(nc, width=width, depth=10,
                                                             kernel_init=init),
    'vgg11': lambda nc, width, depth, init: models.vgg11(nc, kernel_init=init),
    'vgg11_bn': lambda nc, width, depth, init: models.vgg11(nc, batch_norm=True,
                                                            kernel_init=init),
    'resnet18': lambda nc, width, depth, init: models.resnet18(
        nc, width=width, small_inputs=True, kernel_init=init),
    'alexnet': lambda nc, width, depth, init: models.AlexNet(nc, kernel_init=init),
}


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of one run (the binary's flags)."""
  model: str = 'vanilla'
  width: int = 64
  depth: int = 4
  init_scale: float = 0.0  # > 0: conv kernels ~ N(0, init_scale^2); 0: Flax's lecun_normal.
  dataset: str = 'mnist'
  train_split: str = 'train[:2000]'
  test_split: str = 'test'
  holdout_fraction: float = 0.0  # > 0: split train_split into train/test, ignore test_split.
  split_seed: int = 0
  tfds_data_dir: Optional[str] = None
  manual_dir: Optional[str] = None
  optimizer: str = 'adam'
  loss: str = 'cross_entropy'
  learning_rate: float = 1e-3
  momentum: float = 0.9
  epochs: int = 10
  batch_size: int = 64
  seed: int = 0
  agop_images: int = 500  # training images the AGOP is averaged over (0: all)
  epoch_eval_images: int = 1000  # test images evaluated after each epoch (0: all)
  chunk_size: int = 32
  generic_check: bool = False  # also compute the generic (explicit-patch) AGOP
  num_devices: int = 0  # local devices to train on, data parallel (0: train's default)


def load_data(config: Config):
  """Train and test `jconvrfm.data.Dataset`s as the config asks."""
  from jconvrfm import data  # pylint: disable=g-import-not-at-top
  kw = {}
  if config.dataset.split(':')[0] not in data.PREFIXES or config.dataset.startswith('tfds:'):
    kw = dict(data_dir=config.tfds_data_dir, manual_dir=config.manual_dir)
  train = data.load(config.dataset, config.train_split, **kw)
  if config.holdout_fraction > 0:
    train, test = data.split(train, [1 - config.holdout_fraction, config.holdout_fraction],
                             seed=config.split_seed)
  else:
    test = data.load(config.dataset, config.test_split, **kw)
  return train, test


def _bar_chart(records, title: str):
  """The per-layer bar chart (a matplotlib figure)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = [r.name for r in records]
  x = np.arange(len(names))
  fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names) + 2), 3.5))
  series = [('corr(CNFM, G) trained', [r.corr_agop for r in records]),
            ('corr(CNFM, G^1/2) trained', [r.corr_sqrt_agop for r in records]),
            ('baseline corr(CNFM_0, CNFM)', [r.baseline_corr for r in records])]
  for i, (label, vals) in enumerate(series):
    ax.bar(x + (i - 1) * 0.27, [np.nan if v is None else v for v in vals], 0.27, label=label)
  ax.set_xticks(x, names, rotation=30, ha='right')
  ax.set_ylim(min(0, *[v for _, vals in series for v in vals if v is not None]), 1)
  ax.set_ylabel('Pearson correlation')
  ax.set_title(title)
  ax.legend(fontsize=7, loc='lower left')
  fig.tight_layout()
  return fig


def train_devices(num_devices: int) -> Optional[List[jax.Device]]:
  """The first `num_devices` local devices of every process, or None (train's default) for 0.

  `num_devices` must be in [0, local device count].
  """
  if not 0 <= num_devices <= jax.local_device_count():
    raise ValueError(f'`num_devices` must be in [0, {jax.local_device_count()}] (0: every '
                     f'local accelerator, or one CPU device), got {num_devices}.')
  if not num_devices:
    return None
  return [d for own in processes.devices_by_process() for d in own[:num_devices]]


def run(config: Config, workdir, *, train_data=None, test_data=None,
        progress: bool = True) -> Dict[str, Any]:
  """Trains, evaluates and writes the CNFA report; returns the results dict.

  `train_data`/`test_data` (`jconvrfm.data.Dataset`s) replace loading (tests, notebooks).
  Bad settings and data fail before the workdir is created. An existing workdir must hold
  the same configuration (but for `num_devices`); training then resumes from its latest
  checkpoint. In a multi-process run (`--distributed`) every process calls this; process 0
  alone writes the workdir.
  """
  if config.model not in MODELS:
    raise ValueError(f'`model` must be one of {sorted(MODELS)}, got {config.model!r}.')
  devices = train_lib.data_parallel_devices(train_devices(config.num_devices),
                                            config.batch_size)
  if train_data is None:
    t = time.time()
    train_data, test_data = load_data(config)
    logging.info('Loaded %s: train %s, test %s (%.1f s).', config.dataset,
                 train_data.images.shape, test_data.images.shape, time.time() - t)
  wd = multihost.prepare_workdir(None if workdir is None else str(workdir),
                                 dataclasses.asdict(config), prefix='verify_ansatz_',
                                 ignore=('num_devices',))
  nc = int(train_data.num_classes)
  init = (nn.initializers.normal(config.init_scale) if config.init_scale > 0 else
          nn.initializers.lecun_normal())
  model = MODELS[config.model](nc, config.width, config.depth, init)

  n_eval = config.epoch_eval_images or test_data.images.shape[0]
  t = time.time()
  result = train_lib.train(
      model, train_data.images, train_data.labels, num_classes=nc, epochs=config.epochs,
      batch_size=config.batch_size, optimizer=config.optimizer,
      learning_rate=config.learning_rate, momentum=config.momentum, loss=config.loss,
      seed=config.seed, eval_images=test_data.images[:n_eval],
      eval_labels=test_data.labels[:n_eval],
      workdir=wd.root, progress=progress, devices=devices)
  train_time = time.time() - t
  # Evaluation splits its batches over the training devices; the report's chunks go to
  # them from each process's own copy of the (replicated) trained state.
  train_eval = train_lib.evaluate(model, result.state.variables, train_data.images,
                                  train_data.labels, num_classes=nc, loss=config.loss,
                                  devices=devices)
  test_eval = train_lib.evaluate(model, result.state.variables, test_data.images,
                                 test_data.labels, num_classes=nc, loss=config.loss,
                                 devices=devices)
  variables = processes.local_replica(result.state.variables)
  logging.info('train accuracy %.4f, test accuracy %.4f', train_eval['accuracy'],
               test_eval['accuracy'])

  # The same initialisation `train` started from (parameters drawn from `seed`).
  initial = train_lib.init_state(model, train_lib.make_optimizer(config.optimizer),
                                 train_data.images, config.seed).variables
  n_agop = config.agop_images or train_data.images.shape[0]
  agop_x = train_data.images[:n_agop]
  t = time.time()
  records = report_lib.cnfa_report(model, variables, agop_x, initial_variables=initial,
                                   chunk_size=config.chunk_size, generic=config.generic_check,
                                   devices=devices)
  report_time = time.time() - t
  wd.write_text('cnfa.json', report_lib.to_json(records))
  table = report_lib.markdown_table(records)
  wd.write_text('cnfa.md', table + '\n')
  logging.info('CNFA report (%d AGOP images):\n%s', agop_x.shape[0], table)
  if multihost.is_writer():
    title = f'{config.model} on {config.dataset}: test acc {test_eval["accuracy"]:.3f}'
    wd.save_figure('cnfa.png', _bar_chart(records, title), dpi=120)
  results = {'train_accuracy': train_eval['accuracy'], 'test_accuracy': test_eval['accuracy'],
             'test_loss': test_eval['loss'], 'n_train': int(train_data.images.shape[0]),
             'n_test': int(test_data.images.shape[0]), 'n_agop': int(agop_x.shape[0]),
             'train_time_s': train_time, 'report_time_s': report_time,
             'steps': int(result.state.step), 'backend': jax.default_backend(),
             'train_devices': len(devices), 'processes': jax.process_count()}
  wd.write_text('results.json', json.dumps(results, indent=2))
  return results


# ----------------------------------------------------------------------------------------------
# absl wiring.
# ----------------------------------------------------------------------------------------------

_DEFAULTS = Config()
_FLAG_HELP = {
    'model': f'one of {sorted(MODELS)}', 'width': 'conv width (vanilla, Myrtle, ResNet)',
    'depth': 'conv layers (vanilla)', 'init_scale': 'conv init std (0: lecun_normal)',
    'dataset': "jconvrfm.data.load spec: 'mnist', 'cifar10', 'folder:<path>', ...",
    'train_split': 'tfds split string', 'test_split': 'tfds split string',
    'holdout_fraction': 'if > 0, split train_split into train/test with split_seed',
    'split_seed': 'seed of the holdout split', 'tfds_data_dir': 'tfds data_dir',
    'manual_dir': 'tfds manual_dir (offline files)', 'optimizer': 'adam or sgd',
    'loss': 'mse or cross_entropy', 'learning_rate': 'learning rate',
    'momentum': 'SGD momentum', 'epochs': 'epochs', 'batch_size': 'batch size',
    'seed': 'init/shuffle seed', 'agop_images': 'training images for the AGOP (0: all)',
    'chunk_size': 'images per AGOP chunk',
    'epoch_eval_images': 'test images evaluated after each epoch (0: all; final eval: all)',
    'generic_check': 'also compute the generic AGOP',
    'num_devices': 'local devices to train on, each batch split over them (0: every local '
                   'accelerator, or one CPU device); batch_size must be a multiple',
}
flags.DEFINE_string('workdir', None, 'output directory', required=True)
multihost.define_flags(flags.FLAGS)
for _f in dataclasses.fields(Config):
  _default = getattr(_DEFAULTS, _f.name)
  _define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float}.get(
      type(_default), flags.DEFINE_string)
  _define(_f.name, _default, _FLAG_HELP[_f.name])
FLAGS = flags.FLAGS


def main(argv) -> None:
  del argv
  multihost.initialize(FLAGS)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')  # TensorFlow only reads data; keep it off GPUs.
  config = Config(**{f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(Config)})
  results = run(config, FLAGS.workdir)
  logging.info('results: %s', results)


if __name__ == '__main__':
  experiments.use_jax_flags()
  app.run(main)
