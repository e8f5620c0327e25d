"""Datasets through TensorFlow Datasets (tfds), loaded whole into host memory.

TensorFlow and tfds are imported lazily, inside the functions, so that importing
`jconvrfm.data` stays light; accelerators are hidden from TensorFlow before it touches data so
that it never claims GPU/TPU memory that JAX needs.
"""

import functools
import pathlib
from typing import Optional, Union

import numpy as np

from jconvrfm._src.data import arrays

# Versions pinned for the datasets the project names (those tensorflow-datasets 4.9.10 provides),
# so that results do not silently change when tfds releases a new version.
PINNED_VERSIONS = {
    'mnist': '3.0.1',
    'fashion_mnist': '3.0.1',
    'kmnist': '3.0.1',
    'emnist': '3.1.0',
    'cifar10': '3.0.2',
    'cifar100': '3.0.2',
    'svhn_cropped': '3.1.0',
    'stl10': '1.0.0',
}

PathLike = Union[str, pathlib.Path]


@functools.lru_cache(maxsize=None)
def import_tfds():
  """Imports tensorflow_datasets with TensorFlow's accelerators hidden; returns the module."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
    tf.config.set_visible_devices([], 'TPU')
  except (RuntimeError, ValueError):
    # Devices were already initialised by someone else's TensorFlow code (or no such device
    # type exists); TensorFlow then keeps its earlier configuration.
    pass
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def _versioned_name(name: str, version: Optional[str]) -> str:
  if not isinstance(name, str) or not name:
    raise ValueError(f'`name` must be a tfds dataset name such as "mnist", got {name!r}.')
  base, _, given = name.partition(':')
  if version is not None and given and given != version:
    raise ValueError(f'`name` {name!r} pins version {given} but `version`={version!r}.')
  version = version or given or PINNED_VERSIONS.get(base.split('/')[0])
  return f'{base}:{version}' if version else base


def _to_dataset(images, labels, num_classes, what) -> arrays.Dataset:
  if images.shape[0] == 0:
    raise ValueError(f'{what}: the split is empty.')
  if images.dtype != np.uint8:
    raise ValueError(f'{what}: expected uint8 images, got {images.dtype}.')
  return arrays.make_dataset(images, labels, num_classes, name=what)


def _read_array_record(builder, split: str, what: str):
  """`(images, labels)` of a split prepared as array_record, decoded without TensorFlow."""
  keys = builder.info.supervised_keys
  if not keys or len(keys) != 2 or not all(isinstance(k, str) for k in keys):
    raise ValueError(f'{what}: not an image classification dataset (its supervised keys are '
                     f'{keys!r}, expected (image, label)).')
  image_key, label_key = keys
  try:
    source = builder.as_data_source(split=split)
  except (ValueError, KeyError, AssertionError) as e:
    available = {k: v.num_examples for k, v in builder.info.splits.items()}
    raise ValueError(f'`split`: cannot read {split!r} of {what}; available splits: '
                     f'{available}.') from e
  examples = source.__getitems__(range(len(source)))
  if not examples:
    raise ValueError(f'{what}: the split is empty.')
  images = np.stack([np.asarray(e[image_key]) for e in examples])
  labels = np.asarray([e[label_key] for e in examples])
  return images, labels


def load_tfds(name: str, split: str, *, data_dir: Optional[PathLike] = None,
              manual_dir: Optional[PathLike] = None,
              version: Optional[str] = None) -> arrays.Dataset:
  """Loads a tfds image classification split whole, as a `Dataset`.

  The split string may slice, as in tfds (`'train[:1000]'`, `'train[90%:]'`,
  `'train[:50%]+test[:10]'`; a `+` split is the concatenation of its parts in order).
  Grayscale datasets keep a channel axis of 1.

  Datasets are prepared (once per `data_dir`) in tfds' array_record format and read through
  `builder.as_data_source`, which decodes the images with NumPy and PIL: reading imports no
  TensorFlow (about 5 s saved per process on a 2-core CPU, and no TensorFlow beside libtpu on
  a TPU VM). Only preparing a dataset needs TensorFlow (tfds encodes the images with it); it
  is then imported with accelerators hidden. A `data_dir` prepared earlier in the TFRecord
  format is read as before, through `tfds.load` and TensorFlow (which returns the same
  examples in the same order, except that it interleaves the parts of a `+` split).

  Args:
    name: tfds name, optionally with config and version (`'mnist'`, `'emnist/digits'`,
      `'cifar10:3.0.2'`). Datasets in `PINNED_VERSIONS` get that version unless one is given.
    split: tfds split string.
    data_dir: tfds data directory (where prepared datasets are cached); tfds' default if None.
    manual_dir: a folder with the dataset's original files, used instead of downloading (e.g.
      the four MNIST `*-ubyte.gz` files); the dataset is prepared from it once into `data_dir`.
    version: explicit version string, overriding the pinned one.

  Returns:
    `Dataset(images (n, H, W, C) float32 in [0, 1], labels (n,) int32, num_classes)`.

  References:
    TensorFlow Datasets, https://www.tensorflow.org/datasets; random-access data sources,
    https://www.tensorflow.org/datasets/api_docs/python/tfds/data_source.

  Example:
    >>> from jconvrfm.data import load_tfds
    >>> ds = load_tfds('mnist', 'test[:8]', data_dir=CACHE_DIR,  # doctest: +SKIP
    ...                manual_dir='../shared/data/mnist')
    >>> ds.images.shape, ds.num_classes  # doctest: +SKIP
    ((8, 28, 28, 1), 10)
  """
  if not isinstance(split, str) or not split:
    raise ValueError(f'`split` must be a tfds split string such as "train[:1000]", got {split!r}.')
  if manual_dir is not None:
    manual_dir = pathlib.Path(manual_dir)
    if not manual_dir.is_dir():
      raise ValueError(f'`manual_dir`: no such folder: {str(manual_dir)!r}.')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  full_name = _versioned_name(name, version)
  data_dir = None if data_dir is None else str(data_dir)
  what = f'tfds {full_name}[{split!r}]'
  try:
    try:
      builder = tfds.builder(full_name, data_dir=data_dir, file_format='array_record')
    except ValueError:   # `data_dir` holds it prepared in another format (TFRecord)
      builder = tfds.builder(full_name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f'`name`: unknown tfds dataset {name!r}.') from e
  if not builder.is_prepared():
    import_tfds()   # TensorFlow, accelerators hidden, before tfds encodes anything with it
    config = None if manual_dir is None else tfds.download.DownloadConfig(
        manual_dir=str(manual_dir))
    builder.download_and_prepare(download_config=config)
  num_classes = (builder.info.features['label'].num_classes
                 if 'label' in builder.info.features else None)
  if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
    images, labels = _read_array_record(builder, split, what)
  else:   # prepared earlier as TFRecord: only tf.data reads it
    tfds = import_tfds()   # TensorFlow, accelerators hidden, before tf.data starts
    ds = builder.as_dataset(split=split, batch_size=-1, as_supervised=True)
    images, labels = tfds.as_numpy(ds)
  return _to_dataset(images, labels, num_classes, what)


def load_image_folder(root: PathLike, split: str = 'test') -> arrays.Dataset:
  """Loads a folder of images laid out as `root/<split>/<label>/<image>` via `tfds.ImageFolder`.

  Labels are the indices of the sorted label folder names (for the CIFAR-10 JPEG folder this
  is the CIFAR-10 class order). tfds orders the examples by a fixed shuffle. All images must
  share one shape. `split` may carry a tfds slice (`'test[:500]'`, `'test[10%:]'`); only the
  selected images are decoded.

  Args:
    root: the folder holding the split folders.
    split: split folder name, optionally sliced.

  Returns:
    `Dataset(images (n, H, W, C) float32 in [0, 1], labels (n,) int32, num_classes)` with
    `num_classes` the number of label folders.

  References:
    `tfds.ImageFolder`, https://www.tensorflow.org/datasets/api_docs/python/tfds/ImageFolder.

  Example:
    >>> from jconvrfm.data import load_image_folder
    >>> ds = load_image_folder('../shared/data/cifar10_jpeg', 'test[:4]')  # doctest: +SKIP
    >>> ds.images.shape, ds.num_classes  # doctest: +SKIP
    ((4, 32, 32, 3), 10)
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise ValueError(f'`root`: no such folder: {str(root)!r}.')
  tfds = import_tfds()
  builder = tfds.ImageFolder(str(root))
  available = {k: v.num_examples for k, v in builder.info.splits.items()}
  try:
    instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits)
  except (ValueError, KeyError, AssertionError) as e:
    raise ValueError(
        f'`split`: cannot read {split!r} from {str(root)!r}; available splits: {available}.'
    ) from e
  parts_x, parts_y = [], []
  for ins in instructions:
    start = ins.from_ or 0
    stop = available[ins.splitname] if ins.to is None else ins.to
    if stop <= start:
      continue
    ds = builder.as_dataset(split=ins.splitname, shuffle_files=False, as_supervised=True)
    ds = ds.skip(start).take(stop - start).batch(stop - start)
    for x, y in tfds.as_numpy(ds):
      parts_x.append(x)
      parts_y.append(y)
  num_classes = builder.info.features['label'].num_classes
  what = f'image folder {str(root)!r}[{split!r}]'
  if not parts_x:
    raise ValueError(f'{what}: the split is empty.')
  return _to_dataset(np.concatenate(parts_x), np.concatenate(parts_y), num_classes, what)
