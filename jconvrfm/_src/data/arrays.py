"""In-memory datasets: the `Dataset` container, its validation, npz files and seeded splits.

Everything here works on host numpy arrays; nothing imports TensorFlow.
"""

import numbers
import pathlib
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np


class Dataset(NamedTuple):
  """A labelled image classification dataset held in host memory.

  Attributes:
    images: `(n, height, width, channels)` NHWC `float32` numpy array. Loaded real images are
      in `[0, 1]` (no normalisation); synthetic local-signal tasks carry Gaussian noise and are
      not clipped, so their values extend beyond `[0, 1]`.
    labels: `(n,)` `int32` numpy array of class indices in `[0, num_classes)`.
    num_classes: number of classes (may exceed the number of distinct labels present).
  """
  images: np.ndarray
  labels: np.ndarray
  num_classes: int


def make_dataset(images, labels, num_classes: Optional[int] = None, *,
                 name: str = 'dataset', dtype=np.float32) -> Dataset:
  """Validates arrays and packs them into a `Dataset`.

  Args:
    images: `(n, H, W, C)` or `(n, H, W)` (grayscale; a channel axis is added) array. Integer
      (`uint8`) images are read as 0..255 and scaled to `[0, 1]`; floating images are kept as
      they are (cast to `dtype`).
    labels: `(n,)` integer class indices, or `(n, num_classes)` one-hot rows.
    num_classes: number of classes; defaults to `max(labels) + 1` (or the one-hot width).
    name: used in error messages.
    dtype: floating dtype of the returned images (`float32` by default).

  Returns:
    A validated `Dataset`.

  Raises:
    ValueError: on empty data, mismatched lengths, NaN/Inf pixels, non-integer or
      out-of-range labels, malformed one-hot rows, or a bad rank.
  """
  images = np.asarray(images)
  labels = np.asarray(labels)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise ValueError(
        f'{name}: images must have shape (n, height, width, channels) or (n, height, width), '
        f'got {images.shape}.')
  n = images.shape[0]
  if n == 0 or images.size == 0:
    raise ValueError(f'{name}: the dataset is empty (images shape {images.shape}).')
  if labels.ndim == 2:  # One-hot rows.
    if not np.all((labels == 0) | (labels == 1)) or not np.all(labels.sum(axis=1) == 1):
      raise ValueError(
          f'{name}: 2-D labels must be one-hot rows (a single 1 per row), got shape '
          f'{labels.shape} with other values.')
    if num_classes is None:
      num_classes = labels.shape[1]
    labels = labels.argmax(axis=1)
  if labels.ndim != 1:
    raise ValueError(f'{name}: labels must have shape (n,) or (n, num_classes), got {labels.shape}.')
  if labels.shape[0] != n:
    raise ValueError(
        f'{name}: images and labels have mismatched lengths ({n} images, {labels.shape[0]} '
        'labels).')
  if not np.issubdtype(labels.dtype, np.integer):
    if np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels)) and np.all(
        labels == np.round(labels)):
      labels = labels.astype(np.int64)
    else:
      raise ValueError(f'{name}: labels must be integer class indices, got dtype {labels.dtype}.')
  if num_classes is None:
    num_classes = int(labels.max()) + 1
  if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or (
      num_classes < 1):
    raise ValueError(f'{name}: num_classes must be a positive integer, got {num_classes!r}.')
  num_classes = int(num_classes)
  lo, hi = int(labels.min()), int(labels.max())
  if lo < 0 or hi >= num_classes:
    raise ValueError(
        f'{name}: labels must lie in [0, {num_classes}), got values in [{lo}, {hi}].')
  if np.issubdtype(images.dtype, np.integer):
    if images.min() < 0 or images.max() > 255:
      raise ValueError(
          f'{name}: integer images must be 0..255, got values in [{images.min()}, '
          f'{images.max()}].')
    images = images.astype(dtype) / np.asarray(255, dtype)
  elif np.issubdtype(images.dtype, np.floating):
    images = images.astype(dtype, copy=False)
  else:
    raise ValueError(f'{name}: images must be integer or floating, got dtype {images.dtype}.')
  bad = ~np.isfinite(images)
  if bad.any():
    raise ValueError(
        f'{name}: images contain {int(bad.sum())} NaN or Inf pixel(s) (first in example '
        f'{int(np.argwhere(bad)[0, 0])}).')
  return Dataset(images=images, labels=labels.astype(np.int32), num_classes=num_classes)


def check_dataset(dataset, name: str = 'dataset') -> Dataset:
  """Validates a `Dataset` (or any `(images, labels, num_classes)` triple)."""
  if not isinstance(dataset, tuple) or len(dataset) != 3:
    raise TypeError(
        f'`{name}` must be a Dataset(images, labels, num_classes), got {type(dataset).__name__}.')
  images, labels, num_classes = dataset
  images = np.asarray(images)
  return make_dataset(images, labels, num_classes, name=name,
                      dtype=images.dtype if np.issubdtype(images.dtype, np.floating)
                      else np.float32)


def load_npz(path: Union[str, pathlib.Path], split: str = 'test', *,
             num_classes: Optional[int] = None) -> Dataset:
  """Loads one split of a `.npz` file of images and labels.

  The file holds `x_<split>` and `y_<split>` arrays (e.g. `x_train, y_train, x_test, y_test`),
  or just `x` and `y`, read with `split='all'`. Images are `(n, H, W, C)` or grayscale
  `(n, H, W)` (a channel axis is added), either `uint8` 0..255 (scaled to `[0, 1]`) or floating
  in `[0, 1]`. Labels are integer `(n,)` or one-hot `(n, num_classes)`.

  Args:
    path: the `.npz` file.
    split: which split, e.g. `'train'` or `'test'`; `'all'` for files with only `x`, `y`.
    num_classes: number of classes; by default the largest label over all of the file's
      label arrays plus one (or the one-hot width), so that splits agree.

  Returns:
    A `Dataset` with `float32` images in `[0, 1]` and `int32` labels.

  Example:
    >>> import numpy as np, tempfile, os
    >>> from jconvrfm.data import load_npz
    >>> f = os.path.join(tempfile.mkdtemp(), 'toy.npz')
    >>> np.savez(f, x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.array([0, 1, 2, 1]),
    ...          x_test=np.zeros((2, 8, 8), np.uint8), y_test=np.array([0, 3]))
    >>> ds = load_npz(f, 'train')
    >>> ds.images.shape, ds.images.dtype, ds.num_classes
    ((4, 8, 8, 1), dtype('float32'), 4)
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f'`path`: no such npz file: {str(path)!r}.')
  with np.load(path, allow_pickle=False) as f:
    keys = set(f.files)
    if split == 'all' and {'x', 'y'} <= keys:
      xk, yk = 'x', 'y'
    else:
      xk, yk = f'x_{split}', f'y_{split}'
    if xk not in keys or yk not in keys:
      splits = sorted(k[2:] for k in keys if k.startswith('x_') and 'y_' + k[2:] in keys)
      if {'x', 'y'} <= keys:
        splits.append('all')
      raise ValueError(
          f'`split`: {split!r} not found in {path.name}; available splits: {splits} '
          f'(arrays: {sorted(keys)}).')
    images, labels = f[xk], f[yk]
    if num_classes is None:
      label_keys = [k for k in keys if k == 'y' or k.startswith('y_')]
      widths = []
      for k in label_keys:
        y = f[k]
        if y.size:
          widths.append(y.shape[1] if y.ndim == 2 else int(np.max(y)) + 1)
      num_classes = max(widths) if widths else None
  if np.issubdtype(images.dtype, np.floating) and images.size and (
      np.nanmin(images) < 0 or np.nanmax(images) > 1):
    raise ValueError(
        f'`path`: floating images in {path.name}[{xk!r}] must lie in [0, 1], got '
        f'[{np.nanmin(images):.3g}, {np.nanmax(images):.3g}].')
  return make_dataset(images, labels, num_classes, name=f'{path.name}[{split!r}]')


def split(dataset: Dataset, sizes: Sequence[Union[int, float]], *,
          seed: int) -> Tuple[Dataset, ...]:
  """Seeded, disjoint random subsets of a dataset.

  Args:
    dataset: the `Dataset` to split (`n` examples).
    sizes: either integer sizes (sum at most `n`) or fractions in `(0, 1]` (sum at most 1).
      With fractions each part gets `floor(f * n)` examples, except that when the fractions
      sum to 1 the last part also takes the leftover examples, so that every example is used.
    seed: seed of the permutation (`numpy.random.default_rng(seed)`).

  Returns:
    A tuple of `Dataset`s, one per entry of `sizes`, in that order, sharing `num_classes`.

  Example:
    >>> import numpy as np
    >>> from jconvrfm.data import Dataset, split
    >>> ds = Dataset(np.zeros((10, 2, 2, 1), np.float32), np.arange(10, dtype=np.int32) % 2, 2)
    >>> train, val = split(ds, [0.8, 0.2], seed=0)
    >>> len(train.labels), len(val.labels)
    (8, 2)
  """
  dataset = check_dataset(dataset)
  n = dataset.labels.shape[0]
  if isinstance(sizes, (numbers.Number, str)) or len(sizes) == 0:
    raise ValueError(f'`sizes` must be a non-empty sequence of sizes or fractions, got {sizes!r}.')
  if any(isinstance(s, bool) or not isinstance(s, numbers.Real) for s in sizes):
    raise ValueError(f'`sizes` must hold numbers, got {sizes!r}.')
  if all(isinstance(s, numbers.Integral) for s in sizes):
    counts = [int(s) for s in sizes]
    if min(counts) < 1 or sum(counts) > n:
      raise ValueError(
          f'`sizes` must be positive integers summing to at most {n} (the dataset size), '
          f'got {list(sizes)}.')
  else:
    fracs = [float(s) for s in sizes]
    if min(fracs) <= 0 or max(fracs) > 1 or sum(fracs) > 1 + 1e-9:
      raise ValueError(
          f'`sizes` given as fractions must lie in (0, 1] and sum to at most 1, got {list(sizes)}.')
    counts = [int(np.floor(f * n + 1e-9)) for f in fracs]
    if abs(sum(fracs) - 1) <= 1e-9:
      counts[-1] = n - sum(counts[:-1])
    if min(counts) < 1:
      raise ValueError(
          f'`sizes` {list(sizes)} of a dataset of {n} examples leaves an empty part '
          f'(sizes {counts}).')
  perm = np.random.default_rng(seed).permutation(n)
  bounds = np.cumsum([0] + counts)
  return tuple(
      Dataset(images=dataset.images[perm[a:b]], labels=dataset.labels[perm[a:b]],
              num_classes=dataset.num_classes)
      for a, b in zip(bounds[:-1], bounds[1:]))
