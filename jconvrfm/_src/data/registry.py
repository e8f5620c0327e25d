"""`load(spec, split, **kw)`: datasets picked by name from a registry (no if/elif chains)."""

import zlib
from typing import Callable, Dict

from jconvrfm._src.data import arrays
from jconvrfm._src.data import synthetic
from jconvrfm._src.data import tfds_io


def split_seed(seed: int, split: str) -> int:
  """A seed for one split of a synthetic dataset: distinct, stable splits from one seed."""
  seed = synthetic._check_seed(seed)  # pylint: disable=protected-access
  return int(((seed * 0x9E3779B1) ^ zlib.crc32(split.encode())) % (2**63))


def _synthetic(generator):
  def loader(split, *, n, seed, **kw):
    return generator(n, seed=split_seed(seed, split), **kw)
  loader.__doc__ = (f'`{generator.__name__}(n, seed=split_seed(seed, split), **kw)`: '
                    'keyword arguments n and seed are required.')
  return loader


def _noisy_mnist(split, *, seed, data_dir=None, manual_dir=None, frame_size=42, sigma=1.0,
                 combine='replace'):
  mnist = tfds_io.load_tfds('mnist', split, data_dir=data_dir, manual_dir=manual_dir)
  return synthetic.noisy_frame(mnist, frame_size=frame_size, sigma=sigma,
                               seed=split_seed(seed, split), combine=combine)


def _tfds(name):
  def loader(split, **kw):
    return tfds_io.load_tfds(name, split, **kw)
  return loader


# Datasets by exact name: loader(split, **kw) -> Dataset.
REGISTRY: Dict[str, Callable[..., arrays.Dataset]] = {
    **{name: _tfds(name) for name in tfds_io.PINNED_VERSIONS},
    'star': _synthetic(synthetic.star),
    'bars': _synthetic(synthetic.bars),
    'toy_1d': _synthetic(synthetic.toy_1d),
    'noisy_mnist': _noisy_mnist,
}

# Datasets by prefix, `'<prefix>:<argument>'`: loader(argument, split, **kw) -> Dataset.
PREFIXES: Dict[str, Callable[..., arrays.Dataset]] = {
    'tfds': tfds_io.load_tfds,
    'folder': tfds_io.load_image_folder,
    'npz': arrays.load_npz,
}


def load(spec: str, split: str, **kw) -> arrays.Dataset:
  """Loads a dataset picked by name.

  Names (`REGISTRY`): the tfds datasets with pinned versions (`'mnist'`, `'cifar10'`,
  `'svhn_cropped'`, ...; keyword arguments go to `load_tfds`, e.g. `data_dir`, `manual_dir`);
  the synthetic tasks `'star'`, `'bars'`, `'toy_1d'` (keyword arguments `n` and `seed` are
  required, the rest go to the generator); `'noisy_mnist'` (MNIST through tfds pasted into
  noise frames by `noisy_frame`; `seed` required, optional `data_dir`, `manual_dir`,
  `frame_size`, `sigma`, `combine`). Prefixes (`PREFIXES`): `'tfds:<name>'` (any tfds dataset,
  e.g. `'tfds:emnist/digits'`), `'folder:<path>'` (`load_image_folder`), `'npz:<path>'`
  (`load_npz`).

  Synthetic datasets derive the seed of each split from `(seed, split)` (see `split_seed`),
  so `load('star', 'train', n=50, seed=0)` and `load('star', 'test', n=2050, seed=0)` are
  independent draws.

  Args:
    spec: dataset name or `'<prefix>:<argument>'`.
    split: split string, passed on (a tfds split string for tfds and folders, an npz split,
      or just a name for synthetic data).
    **kw: passed on to the loader.

  Returns:
    A `Dataset`.

  Example:
    >>> from jconvrfm.data import load
    >>> ds = load('bars', 'train', n=10, seed=0)
    >>> ds.images.shape, ds.num_classes
    ((10, 16, 16, 1), 2)
  """
  if not isinstance(spec, str):
    raise ValueError(f'`spec` must be a dataset name string, got {spec!r}.')
  if spec in REGISTRY:
    return REGISTRY[spec](split, **kw)
  prefix, sep, argument = spec.partition(':')
  if sep and prefix in PREFIXES and argument:
    return PREFIXES[prefix](argument, split, **kw)
  raise ValueError(
      f'`spec`: unknown dataset {spec!r}; known names: {sorted(REGISTRY)}, or one of the '
      f'prefixes {[p + ":<...>" for p in PREFIXES]}.')
