"""Seeded generators for the paper's local-signal tasks (arXiv:2309.00570, section 5).

In each task a small signal sits at a random position in noise, so that a fixed
convolutional kernel (which weights all positions alike) struggles and a learned patch metric
helps. All generators draw from `numpy.random.default_rng(seed)`: the same seed gives the same
data, bit for bit. Values are never clipped, so images are not confined to `[0, 1]`.
"""

import numbers
from typing import Sequence, Tuple

import numpy as np

from jconvrfm._src.data import arrays


def _check_seed(seed):
  if seed is None or isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
    raise ValueError(f'`seed` must be a non-negative integer, got {seed!r}.')
  return int(seed)


def _check_int(value, name, minimum=1):
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f'`{name}` must be an integer >= {minimum}, got {value!r}.')
  return int(value)


def _check_nonneg(value, name):
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(
      value) or value < 0:
    raise ValueError(f'`{name}` must be a finite number >= 0, got {value!r}.')
  return float(value)


def _check_dtype(dtype):
  dtype = np.dtype(dtype)
  if dtype not in (np.float32, np.float64):
    raise ValueError(f'`dtype` must be float32 or float64, got {dtype}.')
  return dtype


def _noise(rng, shape, std, dtype):
  return rng.standard_normal(shape, dtype=dtype) * dtype.type(std)


def _balanced_labels(rng, n, num_classes=2):
  """`n` labels with class counts differing by at most one, in random order."""
  return rng.permutation(np.arange(n) % num_classes).astype(np.int32)


def noisy_frame(dataset: arrays.Dataset, *, frame_size: int = 42, sigma: float = 1.0,
                seed: int, combine: str = 'replace') -> arrays.Dataset:
  """Pastes each image at a uniformly random offset into a larger frame of Gaussian noise.

  The frame is i.i.d. `N(0, (0.5 * sqrt(sigma))^2)` noise of shape `(frame_size, frame_size)`
  in every channel. The top-left corner `(i, j)` of the pasted `H x W` image is uniform over
  `{0, ..., frame_size - H} x {0, ..., frame_size - W}`, independently per example. With
  `combine='replace'` (default) the image replaces the noise under it (the digit itself is
  noise-free); with `combine='add'` it is added to the noise. Nothing is clipped: the result
  is no longer in `[0, 1]`.

  Args:
    dataset: `Dataset` with images `(n, H, W, C)` (e.g. MNIST, 28 x 28 x 1).
    frame_size: side of the square output frame, at least `max(H, W)`.
    sigma: noise level; the noise std is `0.5 * sqrt(sigma)`.
    seed: seed of the noise and the offsets.
    combine: `'replace'` or `'add'`.

  Returns:
    `Dataset(images (n, frame_size, frame_size, C) of the input dtype, same labels and
    num_classes)`.

  References:
    D. Beaglehole et al., arXiv:2309.00570, section 5 ("noisy MNIST", sigma = 1).

  Example:
    >>> import numpy as np
    >>> from jconvrfm.data import Dataset, noisy_frame
    >>> ds = Dataset(np.ones((2, 28, 28, 1), np.float32), np.array([3, 7], np.int32), 10)
    >>> noisy_frame(ds, seed=0).images.shape
    (2, 42, 42, 1)
  """
  dataset = arrays.check_dataset(dataset)
  seed = _check_seed(seed)
  frame_size = _check_int(frame_size, 'frame_size')
  sigma = _check_nonneg(sigma, 'sigma')
  if combine not in ('replace', 'add'):
    raise ValueError(f"`combine` must be 'replace' or 'add', got {combine!r}.")
  images = dataset.images
  n, h, w, c = images.shape
  if frame_size < max(h, w):
    raise ValueError(
        f'`frame_size` ({frame_size}) must be at least the image size ({h} x {w}).')
  rng = np.random.default_rng(seed)
  dtype = images.dtype
  out = _noise(rng, (n, frame_size, frame_size, c), 0.5 * np.sqrt(sigma), dtype)
  rows = rng.integers(0, frame_size - h + 1, size=n)
  cols = rng.integers(0, frame_size - w + 1, size=n)
  for k in range(n):
    region = out[k, rows[k]:rows[k] + h, cols[k]:cols[k] + w]
    if combine == 'replace':
      region[...] = images[k]
    else:
      region += images[k]
  return arrays.Dataset(images=out, labels=dataset.labels.copy(),
                        num_classes=dataset.num_classes)


# The star of the authors' reference generator, in its 7 x 7 bounding box (row by row): a
# five-pointed star of 28 pixels. Source: aradha/agop_feature_learning,
# kernel_machine_agop/conv_rfm/crfm_src/star_dataset.py (`draw_star`).
_REFERENCE_STAR = (
    '...#...',
    '..###..',
    '#######',
    '.#####.',
    '..###..',
    '.#####.',
    '.##.##.',
)

# Where the reference puts the star's bounding box in an `S x S` image: its top-left corner is
# `(3 + a, 7 + b)` with `a, b` uniform on `{0, ..., S - 15}` (so rows 3..20 and columns 7..24
# for S = 32), i.e. `(row_lo, col_lo) = (3, 7)` and `(row_hi, col_hi) = (S - 12, S - 8)`.
_REFERENCE_CORNER_LO = (3, 7)
_REFERENCE_CORNER_MARGIN = (12, 8)

STAR_SHAPES = ('reference', 'asterisk')
STAR_PLACEMENTS = ('reference', 'uniform')


def star_mask(size: int = 7, *, shape: str = 'reference') -> np.ndarray:
  """The star of the "star" task as a `(size, size)` boolean mask.

  Args:
    size: side of the mask. `shape='reference'` exists only for `size=7`; `'asterisk'` takes
      any odd size >= 3.
    shape: `'reference'` (default): the authors' five-pointed star, 28 pixels in a 7 x 7 box
      (rows, top to bottom: `...#...`, `..###..`, `#######`, `.#####.`, `..###..`, `.#####.`,
      `.##.##.`); `'asterisk'`: middle row, middle column and both diagonals.

  Returns:
    A `(size, size)` boolean array, True on the star.

  References:
    D. Beaglehole et al., arXiv:2309.00570, section 5. The reference shape is the one drawn by
    `draw_star` in aradha/agop_feature_learning,
    kernel_machine_agop/conv_rfm/crfm_src/star_dataset.py.

  Example:
    >>> from jconvrfm.data import star_mask
    >>> int(star_mask().sum()), int(star_mask(5, shape='asterisk').sum())
    (28, 17)
  """
  if shape not in STAR_SHAPES:
    raise ValueError(f'`star_shape` must be one of {STAR_SHAPES}, got {shape!r}.')
  size = _check_int(size, 'star_size', 3)
  if shape == 'reference':
    if size != len(_REFERENCE_STAR):
      raise ValueError(
          f"`star_size` must be {len(_REFERENCE_STAR)} for star_shape='reference', got {size}.")
    return np.array([[ch == '#' for ch in row] for row in _REFERENCE_STAR], dtype=bool)
  if size % 2 == 0:
    raise ValueError(f'`star_size` must be odd, got {size}.')
  mask = np.eye(size, dtype=bool) | np.fliplr(np.eye(size, dtype=bool))
  mask[size // 2, :] = True
  mask[:, size // 2] = True
  return mask


def star_corner_range(image_size: int = 32, star_size: int = 7,
                      placement: str = 'reference') -> Tuple[Tuple[int, int], Tuple[int, int]]:
  """Inclusive ranges of the star's top-left corner: `((row_lo, row_hi), (col_lo, col_hi))`.

  Args:
    image_size: side of the square image.
    star_size: side of the star's bounding box.
    placement: `'reference'` (default): as the authors' generator, rows
      `3 .. image_size - 12` and columns `7 .. image_size - 8` (3..20 and 7..24 for a 32 x 32
      image: the star never touches the top 3 rows or the left 7 columns); `'uniform'`: every
      position that keeps the star inside the image, `0 .. image_size - star_size` in both axes.

  Returns:
    `((row_lo, row_hi), (col_lo, col_hi))`, both ranges inclusive.

  Raises:
    ValueError: unknown placement, or the star does not fit in the image at every corner in
      the range.

  References:
    aradha/agop_feature_learning, kernel_machine_agop/conv_rfm/crfm_src/star_dataset.py
    (offsets `random.randint(0, IMG_SIZE - 15)` added to the star's rows 3.. and columns 7..).

  Example:
    >>> from jconvrfm._src.data.synthetic import star_corner_range
    >>> star_corner_range(32, 7), star_corner_range(32, 7, 'uniform')
    (((3, 20), (7, 24)), ((0, 25), (0, 25)))
  """
  if placement not in STAR_PLACEMENTS:
    raise ValueError(f'`placement` must be one of {STAR_PLACEMENTS}, got {placement!r}.')
  if placement == 'uniform':
    hi = image_size - star_size
    ranges = ((0, hi), (0, hi))
  else:
    ranges = tuple((lo, image_size - margin)
                   for lo, margin in zip(_REFERENCE_CORNER_LO, _REFERENCE_CORNER_MARGIN))
  for lo, hi in ranges:
    if hi < lo or hi + star_size > image_size:
      raise ValueError(
          f'a {star_size}-pixel star does not fit in a {image_size}-pixel image with '
          f'placement={placement!r}.')
  return ranges


def star(n: int, *, seed: int, image_size: int = 32, noise_std: float = 0.3,
         star_shape: str = 'reference', star_size: int = 7, placement: str = 'reference',
         channels: int = 3, star_channels: Sequence[int] = (2,),
         dtype=np.float32) -> arrays.Dataset:
  """The "star" task: is there a small star somewhere in the noise?

  Every image is i.i.d. `N(0, noise_std^2)` noise of shape `(image_size, image_size,
  channels)`. Positives (label 1) also carry a star (`star_mask(star_size, shape=star_shape)`)
  whose pixels are set to 1 (replacing the noise) in the channels `star_channels`; the top-left
  corner of its bounding box is uniform over `star_corner_range(image_size, star_size,
  placement)`, independently per image. Labels are balanced (counts differ by at most one) in
  random order.

  The defaults are the authors' reference generator: 3 x 32 x 32 images, noise std 0.3, the
  28-pixel five-pointed star of value 1, its 7 x 7 box at rows 3..20 and columns 7..24. The
  reference file has two stored versions that differ only in the star's channels: the last
  channel (`ex[-1]`) or channels 0 and 1 (`ex[:c]` with `c=2`). The default is the last
  channel, `star_channels=(2,)`, the version that reproduces the reference notebook's numbers
  (q = 11, depth 1, 50 train / 2050 test, ridge 1e-3: CNTK 78.0% -> 94.8% after one update;
  ours, mean of seeds 0-3, same protocol: 78.0% -> 94.5%; with `star_channels=(0, 1)`:
  86.0% -> 95.7%). The reference draws equally many positives and negatives and shuffles
  them, then takes the first 50 as training set and the other 2050 as test set, so its
  training set is balanced only on average; here every call is balanced.

  Args:
    n: number of examples.
    seed: random seed.
    image_size: side of the square image (reference: 32).
    noise_std: noise standard deviation (reference: 0.3).
    star_shape: `'reference'` (five-pointed, 7 x 7) or `'asterisk'` (see `star_mask`).
    star_size: side of the star's bounding box (7; any odd size for `'asterisk'`).
    placement: `'reference'` or `'uniform'` (see `star_corner_range`).
    channels: number of channels (reference: 3).
    star_channels: the channels that carry the star (reference: `(2,)`, the last one;
      `(0, 1)` in the other stored version).
    dtype: float32 or float64.

  Returns:
    `Dataset(images (n, image_size, image_size, channels), labels (n,) int32 in {0, 1}, 2)`.

  References:
    D. Beaglehole et al., arXiv:2309.00570, section 5 and appendix (star, q = 11). Facts
    (shape, value, channels, offsets, noise, class counts) from the authors' generator:
    aradha/agop_feature_learning, kernel_machine_agop/conv_rfm/crfm_src/star_dataset.py
    (versions a7c8bc35: last channel, 9650a768: channels 0 and 1), used through `get_star` in
    kernel_machine_agop/conv_rfm/crfm_src/dataset.py by
    kernel_machine_agop/conv_rfm/CRFM_star.ipynb (whose output reports the 78.0% / 94.8%).

  Example:
    >>> from jconvrfm.data import star
    >>> ds = star(4, seed=0)
    >>> ds.images.shape, sorted(ds.labels.tolist())
    ((4, 32, 32, 3), [0, 0, 1, 1])
  """
  n = _check_int(n, 'n')
  seed = _check_seed(seed)
  image_size = _check_int(image_size, 'image_size')
  channels = _check_int(channels, 'channels')
  noise_std = _check_nonneg(noise_std, 'noise_std')
  dtype = _check_dtype(dtype)
  mask = star_mask(star_size, shape=star_shape)
  if star_size > image_size:
    raise ValueError(f'`star_size` ({star_size}) must not exceed `image_size` ({image_size}).')
  (row_lo, row_hi), (col_lo, col_hi) = star_corner_range(image_size, star_size, placement)
  star_channels = list(star_channels)
  if not star_channels or any(
      isinstance(ch, bool) or not isinstance(ch, numbers.Integral) or not 0 <= ch < channels
      for ch in star_channels) or len(set(star_channels)) != len(star_channels):
    raise ValueError(
        f'`star_channels` must be distinct channel indices in [0, {channels}), got '
        f'{star_channels!r}.')
  rng = np.random.default_rng(seed)
  labels = _balanced_labels(rng, n)
  images = _noise(rng, (n, image_size, image_size, channels), noise_std, dtype)
  rows = rng.integers(row_lo, row_hi + 1, size=n)
  cols = rng.integers(col_lo, col_hi + 1, size=n)
  for k in np.flatnonzero(labels == 1):
    window = images[k, rows[k]:rows[k] + star_size, cols[k]:cols[k] + star_size]
    for ch in star_channels:
      window[..., ch][mask] = 1
  return arrays.Dataset(images=images, labels=labels, num_classes=2)


def bars(n: int, *, seed: int, image_size: int = 16, noise_std: float = 1.5,
         bar_shape: Tuple[int, int] = (3, 7), dtype=np.float32) -> arrays.Dataset:
  """The "bars" task: is the block of ones lying (class 0) or standing (class 1)?

  Every image is `(image_size, image_size, 1)` i.i.d. `N(0, noise_std^2)` noise plus (added, not
  replacing) a block of ones of shape `bar_shape` (rows x columns; class 0) or its transpose
  (class 1), whose top-left corner is uniform over all positions keeping it inside the image.
  Labels are balanced, in random order.

  Args:
    n: number of examples.
    seed: random seed.
    image_size: side of the square image (paper: 16).
    noise_std: noise standard deviation (paper: 1.5).
    bar_shape: `(rows, cols)` of the class-0 block (paper: 3 x 7).
    dtype: float32 or float64.

  Returns:
    `Dataset(images (n, image_size, image_size, 1), labels (n,) int32 in {0, 1}, 2)`.

  References:
    D. Beaglehole et al., arXiv:2309.00570, section 5.

  Example:
    >>> from jconvrfm.data import bars
    >>> bars(6, seed=1).images.shape
    (6, 16, 16, 1)
  """
  n = _check_int(n, 'n')
  seed = _check_seed(seed)
  image_size = _check_int(image_size, 'image_size')
  noise_std = _check_nonneg(noise_std, 'noise_std')
  dtype = _check_dtype(dtype)
  if len(bar_shape) != 2:
    raise ValueError(f'`bar_shape` must be (rows, cols), got {bar_shape!r}.')
  a, b = (_check_int(s, 'bar_shape') for s in bar_shape)
  if max(a, b) > image_size:
    raise ValueError(f'`bar_shape` {bar_shape} does not fit in a {image_size}-pixel image.')
  rng = np.random.default_rng(seed)
  labels = _balanced_labels(rng, n)
  images = _noise(rng, (n, image_size, image_size, 1), noise_std, dtype)
  u = rng.random(size=(n, 2))
  for k in range(n):
    bh, bw = (a, b) if labels[k] == 0 else (b, a)
    i = int(u[k, 0] * (image_size - bh + 1))
    j = int(u[k, 1] * (image_size - bw + 1))
    images[k, i:i + bh, j:j + bw, 0] += 1
  return arrays.Dataset(images=images, labels=labels, num_classes=2)


def toy_1d(n: int, *, seed: int, rows: int = 16, length: int = 32,
           dtype=np.float32) -> arrays.Dataset:
  """The 1-D toy task: which sign has the one constant row hidden among Gaussian rows?

  Each example is `rows` rows of `length` i.i.d. `N(0, 1)` entries; one uniformly random row
  is replaced by `y * ones(length) / sqrt(length)` with `y` in `{-1, +1}`. The label is
  `(y + 1) / 2` in `{0, 1}`, balanced, in random order.

  Args:
    n: number of examples.
    seed: random seed.
    rows: number of rows (paper: 16).
    length: row length (paper: 32).
    dtype: float32 or float64.

  Returns:
    `Dataset(images (n, rows, length, 1), labels (n,) int32 in {0, 1}, 2)`.

  References:
    D. Beaglehole et al., arXiv:2309.00570, section 5.

  Example:
    >>> from jconvrfm.data import toy_1d
    >>> toy_1d(4, seed=0).images.shape
    (4, 16, 32, 1)
  """
  n = _check_int(n, 'n')
  seed = _check_seed(seed)
  rows = _check_int(rows, 'rows')
  length = _check_int(length, 'length')
  dtype = _check_dtype(dtype)
  rng = np.random.default_rng(seed)
  labels = _balanced_labels(rng, n)
  images = _noise(rng, (n, rows, length, 1), 1.0, dtype)
  which = rng.integers(0, rows, size=n)
  y = (2 * labels - 1).astype(dtype) / dtype.type(np.sqrt(length))
  images[np.arange(n), which, :, 0] = y[:, None]
  return arrays.Dataset(images=images, labels=labels, num_classes=2)
