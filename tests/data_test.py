"""Tests for jconvrfm.data: real data against independent decoders, generators, errors."""

import doctest
import gzip
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jconvrfm import data
from jconvrfm._src.data import arrays
from jconvrfm._src.data import registry
from jconvrfm._src.data import synthetic
from jconvrfm._src.data import tfds_io


def _read_idx(path):
  """Decodes an MNIST idx file with numpy only (big-endian header, then raw uint8)."""
  with gzip.open(path, 'rb') as f:
    raw = f.read()
  ndim = raw[3]
  dims = np.frombuffer(raw, '>u4', count=ndim, offset=4)
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _as_uint8(images):
  out = np.round(images * 255)
  assert np.all(np.abs(out - images * 255) < 1e-3), 'images are not k/255 values'
  return out.astype(np.uint8)


# --- MNIST through tfds ----------------------------------------------------------------------


def test_mnist_test_split_equals_idx_files(mnist_tfds, mnist_dir):
  ds = data.load_tfds('mnist', 'test', data_dir=mnist_tfds, manual_dir=mnist_dir)
  assert ds.images.shape == (10000, 28, 28, 1) and ds.images.dtype == np.float32
  assert ds.labels.shape == (10000,) and ds.labels.dtype == np.int32
  assert ds.num_classes == 10
  assert ds.images.min() == 0.0 and ds.images.max() == 1.0
  ref_x = _read_idx(mnist_dir / 't10k-images-idx3-ubyte.gz')
  ref_y = _read_idx(mnist_dir / 't10k-labels-idx1-ubyte.gz')
  np.testing.assert_array_equal(np.bincount(ds.labels, minlength=10),
                                np.bincount(ref_y, minlength=10))
  # tfds stores the examples in its own (shuffled) order: compare as multisets of
  # (pixels, label) pairs.
  ours = sorted(x.tobytes() + bytes([y]) for x, y in zip(_as_uint8(ds.images[..., 0]), ds.labels))
  ref = sorted(x.tobytes() + bytes([y]) for x, y in zip(ref_x, ref_y))
  assert ours == ref


def test_mnist_first_training_images_are_in_idx_file(mnist_tfds, mnist_dir):
  ds = data.load_tfds('mnist', 'train[:50]', data_dir=mnist_tfds)
  ref_x = _read_idx(mnist_dir / 'train-images-idx3-ubyte.gz')
  ref_y = _read_idx(mnist_dir / 'train-labels-idx1-ubyte.gz')
  assert ref_x.shape == (60000, 28, 28)
  index = {x.tobytes(): int(y) for x, y in zip(ref_x, ref_y)}
  for x, y in zip(_as_uint8(ds.images[..., 0]), ds.labels):
    assert index[x.tobytes()] == y
  # Split slicing follows tfds: [:50] is the head of [:100], and percent slices work.
  ds100 = data.load_tfds('mnist', 'train[:100]', data_dir=mnist_tfds)
  np.testing.assert_array_equal(ds100.images[:50], ds.images)
  tail = data.load_tfds('mnist', 'test[99%:]', data_dir=mnist_tfds)
  assert tail.images.shape == (100, 28, 28, 1)


def test_reading_a_prepared_split_imports_no_tensorflow(mnist_tfds):
  # Preparation (the fixture) needed TensorFlow; reading the array_record files must not.
  if not list(pathlib.Path(mnist_tfds).glob('mnist/3.0.1/*.array_record*')):
    pytest.skip(f'{mnist_tfds} holds MNIST in another format (JCONVRFM_TFDS_CACHE)')
  code = ('import sys; from jconvrfm import data; '
          f'ds = data.load_tfds("mnist", "test[:30]+train[:20]", data_dir={str(mnist_tfds)!r}); '
          'assert ds.images.shape == (50, 28, 28, 1), ds.images.shape; '
          'assert "tensorflow" not in sys.modules, "tensorflow imported"')
  subprocess.run([sys.executable, '-c', code], check=True,
                 cwd=pathlib.Path(__file__).resolve().parent.parent)


def test_tfrecord_data_dir_reads_the_same_examples(mnist_tfds, mnist_dir, tmp_path):
  # A data_dir prepared in the TFRecord format (as before array_record) is read through
  # tf.data, and gives the same images in the same order as the array_record path.
  tfds = tfds_io.import_tfds()
  builder = tfds.builder('mnist:3.0.1', data_dir=str(tmp_path), file_format='tfrecord')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(mnist_dir)))
  for split in ('train[:40]', 'test[95%:]'):
    old = data.load_tfds('mnist', split, data_dir=tmp_path)
    new = data.load_tfds('mnist', split, data_dir=mnist_tfds)
    np.testing.assert_array_equal(old.images, new.images)
    np.testing.assert_array_equal(old.labels, new.labels)
  # A '+' split: the array_record path concatenates its parts in order; tf.data interleaves
  # them (blocks of 16), so there the same examples come in another order.
  old = data.load_tfds('mnist', 'train[:40]+test[95%:]', data_dir=tmp_path)
  new = data.load_tfds('mnist', 'train[:40]+test[95%:]', data_dir=mnist_tfds)
  parts = [data.load_tfds('mnist', p, data_dir=mnist_tfds) for p in ('train[:40]', 'test[95%:]')]
  np.testing.assert_array_equal(new.images, np.concatenate([p.images for p in parts]))
  np.testing.assert_array_equal(new.labels, np.concatenate([p.labels for p in parts]))
  key = lambda ds: sorted(x.tobytes() + bytes([y]) for x, y in zip(ds.images, ds.labels))
  assert old.images.shape == (540, 28, 28, 1) and key(old) == key(new)


def test_tfds_versions_and_errors(mnist_tfds):
  assert tfds_io._versioned_name('mnist', None) == 'mnist:3.0.1'
  assert tfds_io._versioned_name('cifar10', None) == 'cifar10:3.0.2'
  assert tfds_io._versioned_name('emnist/digits', None) == 'emnist/digits:3.1.0'
  assert tfds_io._versioned_name('mnist:3.0.1', None) == 'mnist:3.0.1'
  with pytest.raises(ValueError, match='pins version'):
    tfds_io._versioned_name('mnist:3.0.1', '2.0.0')
  with pytest.raises(ValueError, match='split'):
    data.load_tfds('mnist', '', data_dir=mnist_tfds)
  with pytest.raises(ValueError, match='manual_dir'):
    data.load_tfds('mnist', 'test', data_dir=mnist_tfds, manual_dir='/nonexistent/dir')
  with pytest.raises(ValueError, match='unknown tfds dataset'):
    data.load_tfds('no_such_dataset_xyz', 'test', data_dir=mnist_tfds)


def test_noisy_mnist_through_load(mnist_tfds):
  ds = data.load('noisy_mnist', 'test[:20]', seed=3, data_dir=mnist_tfds)
  digits = data.load('mnist', 'test[:20]', data_dir=mnist_tfds)
  assert ds.images.shape == (20, 42, 42, 1) and ds.num_classes == 10
  np.testing.assert_array_equal(ds.labels, digits.labels)
  ref = data.noisy_frame(digits, seed=registry.split_seed(3, 'test[:20]'))
  np.testing.assert_array_equal(ds.images, ref.images)


# --- image folders and npz -------------------------------------------------------------------


def test_cifar_image_folder_labels_match_folders(shared_data):
  root = shared_data / 'cifar10_jpeg'
  if not root.is_dir():
    pytest.skip('CIFAR-10 JPEG folder not found')
  PIL = pytest.importorskip('PIL.Image')
  ds = data.load_image_folder(root, 'test')
  assert ds.images.shape == (10000, 32, 32, 3) and ds.images.dtype == np.float32
  assert ds.num_classes == 10
  np.testing.assert_array_equal(np.bincount(ds.labels), np.full(10, 1000))
  assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
  # Independent reference: decode every file with PIL, then match a sample of loaded images
  # to their nearest decoded file (decoders may differ by a few levels); its folder must be
  # the sorted class name with the loaded label's index.
  classes = sorted(p.name for p in (root / 'test').iterdir() if p.is_dir())
  assert len(classes) == 10
  files, folder = [], []
  for k, name in enumerate(classes):
    for f in sorted((root / 'test' / name).iterdir()):
      files.append(np.asarray(PIL.open(f).convert('RGB'), np.float32) / 255)
      folder.append(k)
  ref = np.stack(files).reshape(len(files), -1)
  folder = np.array(folder)
  sample = np.random.default_rng(0).choice(10000, size=40, replace=False)
  x = ds.images[sample].reshape(40, -1)
  d2 = (x**2).sum(1)[:, None] - 2 * x @ ref.T + (ref**2).sum(1)[None]
  nearest = d2.argmin(1)
  assert np.sqrt(d2[np.arange(40), nearest] / ref.shape[1]).max() < 0.02
  np.testing.assert_array_equal(folder[nearest], ds.labels[sample])
  # Slices read the same examples as the full split.
  part = data.load('folder:' + str(root), 'test[:30]+test[-5:]')
  np.testing.assert_array_equal(part.images, np.concatenate([ds.images[:30], ds.images[-5:]]))
  with pytest.raises(ValueError, match='available splits'):
    data.load_image_folder(root, 'train')


def test_usps_npz(shared_data):
  path = shared_data / 'usps' / 'usps.npz'
  if not path.is_file():
    pytest.skip('USPS npz not found')
  ref = np.load(path)
  for split, n in (('train', 7291), ('test', 2007)):
    ds = data.load('npz:' + str(path), split)
    assert ds.images.shape == (n, 16, 16, 1) and ds.images.dtype == np.float32
    assert ds.labels.dtype == np.int32 and ds.num_classes == 10
    np.testing.assert_array_equal(ds.images[..., 0], ref[f'x_{split}'])
    np.testing.assert_array_equal(ds.labels, ref[f'y_{split}'])
  with pytest.raises(ValueError, match=r"available splits: \['test', 'train'\]"):
    data.load_npz(path, 'val')


def test_gtsrb_npz(shared_data):
  path = shared_data / 'gtsrb' / 'gtsrb_test_subset_35x35.npz'
  if not path.is_file():
    pytest.skip('GTSRB npz not found')
  ds = data.load_npz(path, 'all')
  ref = np.load(path)
  assert ds.images.shape == (7949, 35, 35, 3) and ds.num_classes == 43
  np.testing.assert_array_equal(_as_uint8(ds.images), ref['x'])
  np.testing.assert_array_equal(ds.labels, ref['y'])
  assert set(np.unique(ds.labels)) == set(range(43))


def test_npz_formats_and_errors(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, size=(6, 5, 5, 3), dtype=np.uint8)
  y = np.array([0, 2, 1, 2, 0, 1])
  f = tmp_path / 'onehot.npz'
  np.savez(f, x_train=x, y_train=np.eye(4)[y], x_test=x[:2], y_test=np.eye(4)[y[:2]])
  ds = data.load_npz(f, 'train')
  assert ds.num_classes == 4
  np.testing.assert_array_equal(ds.labels, y)
  np.testing.assert_allclose(ds.images, x / 255.0, rtol=1e-6)

  def save(**arrays_):
    path = tmp_path / 'bad.npz'
    np.savez(path, **arrays_)
    return path

  with pytest.raises(ValueError, match='mismatched lengths'):
    data.load_npz(save(x_test=x, y_test=y[:5]), 'test')
  with pytest.raises(ValueError, match=r'labels must lie in \[0, 2\)'):
    data.load_npz(save(x_test=x, y_test=y), 'test', num_classes=2)
  with pytest.raises(ValueError, match=r'labels must lie in \[0'):
    data.load_npz(save(x_test=x, y_test=y - 1), 'test')
  with pytest.raises(ValueError, match='NaN or Inf'):
    xf = x / 255.0
    xf[3, 1, 1, 0] = np.nan
    data.load_npz(save(x_test=xf, y_test=y), 'test')
  with pytest.raises(ValueError, match=r'must lie in \[0, 1\]'):
    data.load_npz(save(x_test=x * 2.0, y_test=y), 'test')
  with pytest.raises(ValueError, match='empty'):
    data.load_npz(save(x_test=x[:0], y_test=y[:0]), 'test', num_classes=3)
  with pytest.raises(ValueError, match='one-hot'):
    data.load_npz(save(x_test=x, y_test=np.ones((6, 3))), 'test')
  with pytest.raises(ValueError, match='integer class indices'):
    data.load_npz(save(x_test=x, y_test=y + 0.5), 'test')
  with pytest.raises(ValueError, match='no such npz file'):
    data.load_npz(tmp_path / 'missing.npz', 'test')


# --- split -----------------------------------------------------------------------------------


def _toy(n=23, k=3):
  images = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 1), np.float32)
  return data.Dataset(images / n, np.arange(n, dtype=np.int32) % k, k)


def test_split_disjoint_and_seeded():
  ds = _toy()
  a, b, c = data.split(ds, [10, 5, 8], seed=1)
  ids = [np.round(part.images[:, 0, 0, 0] * 23).astype(int) for part in (a, b, c)]
  assert [len(i) for i in ids] == [10, 5, 8]
  np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(23))
  for part, i in zip((a, b, c), ids):
    np.testing.assert_array_equal(part.labels, i % 3)  # Labels stay with their images.
    assert part.num_classes == 3
  a2, _, _ = data.split(ds, [10, 5, 8], seed=1)
  np.testing.assert_array_equal(a2.images, a.images)
  a3, _, _ = data.split(ds, [10, 5, 8], seed=2)
  assert not np.array_equal(a3.images, a.images)
  tr, va = data.split(ds, [0.8, 0.2], seed=0)
  assert (len(tr.labels), len(va.labels)) == (18, 5)  # floor(18.4) and the remainder.
  (half,) = data.split(ds, [0.5], seed=0)
  assert len(half.labels) == 11


@pytest.mark.parametrize('sizes,match', [
    ([20, 5], 'at most 23'), ([0, 5], 'positive'), ([0.9, 0.2], 'sum to at most 1'),
    ([0.01, 0.99], 'empty part'), ([], 'non-empty'), (5, 'non-empty'), (['a'], 'numbers'),
])
def test_split_errors(sizes, match):
  with pytest.raises(ValueError, match=match):
    data.split(_toy(), sizes, seed=0)


def test_dataset_validation_errors():
  x = np.zeros((4, 3, 3, 1), np.float32)
  with pytest.raises(ValueError, match='mismatched lengths'):
    data.make_dataset(x, np.zeros(3, int), 2)
  with pytest.raises(ValueError, match=r'labels must lie in \[0, 2\)'):
    data.make_dataset(x, np.array([0, 1, 2, 0]), 2)
  with pytest.raises(ValueError, match='rank|shape'):
    data.make_dataset(np.zeros((4, 3)), np.zeros(4, int), 2)
  with pytest.raises(TypeError, match='Dataset'):
    data.split((x, np.zeros(4, int)), [2], seed=0)


# --- synthetic tasks -------------------------------------------------------------------------


def _std_tol(num):
  """Five standard errors of a sample standard deviation (relative), Gaussian data."""
  return 5 / np.sqrt(2 * num)


def test_noisy_frame_placement_and_noise():
  n = 300
  rng = np.random.default_rng(0)
  digits = data.Dataset(rng.uniform(0.5, 1, size=(n, 28, 28, 1)).astype(np.float32),
                        np.arange(n, dtype=np.int32) % 10, 10)
  out = data.noisy_frame(digits, seed=7, sigma=2.0)
  assert out.images.shape == (n, 42, 42, 1) and out.images.dtype == np.float32
  np.testing.assert_array_equal(out.labels, digits.labels)
  np.testing.assert_array_equal(data.noisy_frame(digits, seed=7, sigma=2.0).images, out.images)
  assert not np.array_equal(data.noisy_frame(digits, seed=8, sigma=2.0).images, out.images)
  offsets, noise = [], []
  for k in range(n):  # Brute-force search for the pasted digit.
    hits = [(i, j) for i in range(15) for j in range(15)
            if np.array_equal(out.images[k, i:i + 28, j:j + 28], digits.images[k])]
    assert len(hits) == 1
    i, j = hits[0]
    offsets.append(hits[0])
    mask = np.ones((42, 42), bool)
    mask[i:i + 28, j:j + 28] = False
    noise.append(out.images[k, ..., 0][mask])
  offsets = np.array(offsets)
  # Offsets cover 0..14 in both axes, roughly uniformly (mean 7, sd 4.32 per axis).
  assert offsets.min() == 0 and offsets.max() == 14
  np.testing.assert_allclose(offsets.mean(0), 7.0, atol=5 * 4.32 / np.sqrt(n))
  noise = np.concatenate(noise)
  expected = 0.5 * np.sqrt(2.0)
  assert abs(noise.std() / expected - 1) < _std_tol(noise.size)
  assert abs(noise.mean()) < 5 * expected / np.sqrt(noise.size)
  assert out.images.min() < -1.5  # Unclipped.
  # combine='add' gives the same noise and offsets plus the digit.
  added = data.noisy_frame(digits, seed=7, sigma=2.0, combine='add')
  zero = data.noisy_frame(digits._replace(images=0 * digits.images), seed=7, sigma=2.0,
                          combine='add')
  for k, (i, j) in enumerate(offsets[:20]):
    np.testing.assert_allclose(added.images[k, i:i + 28, j:j + 28],
                               zero.images[k, i:i + 28, j:j + 28] + digits.images[k], rtol=1e-6)


def _place(mask, corner, image_size):
  """Brute force: a boolean image that is True exactly on `mask` with its top-left at `corner`."""
  out = np.zeros((image_size, image_size), dtype=bool)
  for a in range(mask.shape[0]):
    for b in range(mask.shape[1]):
      if mask[a, b]:
        out[corner[0] + a, corner[1] + b] = True
  return out


def _star_corners(clean, mask, star_channels):
  """Checks every clean star image pixel by pixel; returns the positives' corners."""
  n, image_size, _, channels = clean.images.shape
  corners = []
  for k in range(n):
    image = clean.images[k]
    if clean.labels[k] == 0:
      assert not image.any()
      continue
    ones = image == 1
    assert np.array_equal(ones, image != 0)  # Only the star, of value 1.
    rows, cols = np.nonzero(ones.any(-1))
    corner = (rows.min(), cols.min())
    expected = _place(mask, corner, image_size)
    for ch in range(channels):
      np.testing.assert_array_equal(ones[..., ch], expected if ch in star_channels else False)
    corners.append(corner)
  return np.array(corners)


def test_star_mask_shapes():
  ref = data.star_mask()
  assert ref.shape == (7, 7) and ref.dtype == bool
  # The reference five-pointed star, row by row (aradha/agop_feature_learning draw_star):
  # one tip pixel, 3, the full arms row of 7, 5, a 3-pixel waist, 5, and two 2-pixel legs.
  np.testing.assert_array_equal(ref.sum(1), [1, 3, 7, 5, 3, 5, 4])
  np.testing.assert_array_equal(ref, ref[:, ::-1])  # Mirror-symmetric.
  assert ref[0, 3] and ref[2].all() and not ref[6, 3] and not ref[6, 0]
  for rows in ([1, 4], [3, 5]):  # Centred runs.
    for r in rows:
      width = ref[r].sum()
      assert ref[r, 3 - width // 2:4 + width // 2].all()
  np.testing.assert_array_equal(data.star_mask(7, shape='reference'), ref)
  ast = data.star_mask(7, shape='asterisk')
  assert ast.sum() == 4 * 7 - 3 and ast[3].all() and ast[:, 3].all() and ast[0, 0]
  assert ast[0, 6] and ast[6, 0] and not ast[0, 1]
  assert data.star_mask(5, shape='asterisk').sum() == 4 * 5 - 3
  with pytest.raises(ValueError, match='star_size'):
    data.star_mask(9)
  with pytest.raises(ValueError, match='odd'):
    data.star_mask(6, shape='asterisk')
  with pytest.raises(ValueError, match='star_shape'):
    data.star_mask(7, shape='circle')


def test_star_corner_range():
  # Reference: offsets randint(0, S - 15) added to rows 3.. and columns 7.. of the star.
  for size in (15, 32, 40):
    assert synthetic.star_corner_range(size, 7) == ((3, size - 12), (7, size - 8))
    assert synthetic.star_corner_range(size, 7, 'uniform') == ((0, size - 7), (0, size - 7))
  with pytest.raises(ValueError, match='fit'):
    synthetic.star_corner_range(14, 7)
  with pytest.raises(ValueError, match='fit'):
    synthetic.star_corner_range(32, 9)  # Columns up to 24 + 9 > 32.
  with pytest.raises(ValueError, match='placement'):
    synthetic.star_corner_range(32, 7, 'centre')


def test_star_task():
  n = 401
  clean = data.star(n, seed=4, noise_std=0.0)
  noisy = data.star(n, seed=4)
  assert noisy.images.shape == (n, 32, 32, 3) and noisy.images.dtype == np.float32
  assert noisy.labels.dtype == np.int32 and noisy.num_classes == 2
  np.testing.assert_array_equal(np.bincount(noisy.labels), [201, 200])
  np.testing.assert_array_equal(clean.labels, noisy.labels)
  corners = _star_corners(clean, data.star_mask(), star_channels=(2,))  # The last channel.
  assert len(corners) == 200
  # Corners cover exactly rows 3..20 and columns 7..24, roughly uniformly (sd 5.19 per axis).
  assert corners[:, 0].min() == 3 and corners[:, 0].max() == 20
  assert corners[:, 1].min() == 7 and corners[:, 1].max() == 24
  np.testing.assert_allclose(corners.mean(0), [11.5, 15.5], atol=5 * 5.19 / np.sqrt(200))
  # In the noisy version the star pixels are exactly 1 (replaced), noise elsewhere.
  star_pixels = clean.images == 1
  np.testing.assert_array_equal(noisy.images[star_pixels], 1.0)
  background = noisy.images[~star_pixels]
  assert abs(background.std() / 0.3 - 1) < _std_tol(background.size)
  assert abs(background.mean()) < 5 * 0.3 / np.sqrt(background.size)
  # The noise is the same with or without the star, off the star.
  np.testing.assert_array_equal(noisy.images[~star_pixels],
                                data.star(n, seed=4).images[~star_pixels])
  # Seeds: reproducible bit for bit, different seeds differ.
  np.testing.assert_array_equal(data.star(n, seed=4).images, noisy.images)
  np.testing.assert_array_equal(data.star(n, seed=4).labels, noisy.labels)
  assert not np.array_equal(data.star(n, seed=5).images, noisy.images)


def test_star_task_options():
  n = 300
  clean = data.star(n, seed=1, noise_std=0.0, star_shape='asterisk', star_size=5,
                    placement='uniform', star_channels=(2,), image_size=20)
  assert clean.images.shape == (n, 20, 20, 3)
  corners = _star_corners(clean, data.star_mask(5, shape='asterisk'), star_channels=(2,))
  assert corners.min() == 0 and corners.max() == 15  # Uniform over 0..20 - 5.
  two = data.star(20, seed=0, noise_std=0.0, star_channels=(0, 1))  # The other version.
  _star_corners(two, data.star_mask(), star_channels=(0, 1))
  np.testing.assert_array_equal(two.labels, data.star(20, seed=0).labels)
  with pytest.raises(ValueError, match='star_channels'):
    data.star(4, seed=0, channels=1)  # The default channel 2 does not exist.
  one = data.star(6, seed=0, channels=1, star_channels=(0,), dtype=np.float64)
  assert one.images.shape == (6, 32, 32, 1) and one.images.dtype == np.float64
  with pytest.raises(ValueError, match='placement'):
    data.star(4, seed=0, placement='centre')
  with pytest.raises(ValueError, match='star_shape'):
    data.star(4, seed=0, star_shape='circle')
  with pytest.raises(ValueError, match='fit'):
    data.star(4, seed=0, image_size=14)


def test_bars_task():
  n = 200
  clean = data.bars(n, seed=2, noise_std=0.0)
  noisy = data.bars(n, seed=2)
  np.testing.assert_array_equal(np.bincount(noisy.labels), [100, 100])
  corners = []
  for k in range(n):
    rows, cols = np.nonzero(clean.images[k, ..., 0])
    shape = (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
    assert shape == ((3, 7) if clean.labels[k] == 0 else (7, 3))
    assert len(rows) == 21 and np.all(clean.images[k][clean.images[k] != 0] == 1)
    corners.append((rows.min(), cols.min()))
  corners = np.array(corners)
  assert corners.min() == 0 and corners.max() == 13  # 16 - 3, reached by some block.
  # Additive: noisy - clean is the noise alone, std 1.5.
  noise = (noisy.images - clean.images).ravel()
  assert abs(noise.std() / 1.5 - 1) < _std_tol(noise.size)


def test_toy_1d_task():
  n = 64
  ds = data.toy_1d(n, seed=0)
  assert ds.images.shape == (n, 16, 32, 1)
  np.testing.assert_array_equal(np.bincount(ds.labels), [32, 32])
  rest = []
  for k in range(n):
    rows = ds.images[k, ..., 0]
    const = [r for r in range(16) if np.all(rows[r] == rows[r, 0])]
    assert len(const) == 1
    y = 2 * ds.labels[k] - 1
    np.testing.assert_allclose(rows[const[0]], y / np.sqrt(32), rtol=1e-6)
    rest.append(np.delete(rows, const[0], axis=0).ravel())
  rest = np.concatenate(rest)
  assert abs(rest.std() - 1) < _std_tol(rest.size)


def test_generator_errors():
  with pytest.raises(ValueError, match='seed'):
    data.star(4, seed=None)
  with pytest.raises(ValueError, match='`n`'):
    data.bars(0, seed=0)
  with pytest.raises(ValueError, match='star_channels'):
    data.star(4, seed=0, star_channels=(0, 3))
  with pytest.raises(ValueError, match='frame_size'):
    data.noisy_frame(data.bars(2, seed=0), frame_size=10, seed=0)
  with pytest.raises(ValueError, match='combine'):
    data.noisy_frame(data.bars(2, seed=0), seed=0, combine='mix')
  with pytest.raises(ValueError, match='sigma'):
    data.noisy_frame(data.bars(2, seed=0), seed=0, sigma=-1.0)
  with pytest.raises(ValueError, match='dtype'):
    data.toy_1d(2, seed=0, dtype=np.int32)
  assert data.toy_1d(2, seed=0, dtype=np.float64).images.dtype == np.float64


# --- load registry, imports, docs ------------------------------------------------------------


def test_load_registry():
  tr = data.load('star', 'train', n=10, seed=0)
  te = data.load('star', 'test', n=10, seed=0)
  assert not np.array_equal(tr.images, te.images)
  np.testing.assert_array_equal(data.load('star', 'train', n=10, seed=0).images, tr.images)
  np.testing.assert_array_equal(
      data.load('toy_1d', 'x', n=4, seed=1, rows=8).images,
      data.toy_1d(4, seed=registry.split_seed(1, 'x'), rows=8).images)
  assert data.load('bars', 'train', n=4, seed=0).images.shape == (4, 16, 16, 1)
  with pytest.raises(ValueError, match=r"unknown dataset 'cifar11'.*'mnist'.*'star'"):
    data.load('cifar11', 'test')
  with pytest.raises(ValueError, match='unknown dataset'):
    data.load('npz:', 'test')


def test_import_does_not_import_tensorflow():
  code = ('import sys, jconvrfm, jconvrfm.data; '
          'assert "tensorflow" not in sys.modules, "tensorflow imported"')
  subprocess.run([sys.executable, '-c', code], check=True,
                 cwd=pathlib.Path(__file__).resolve().parent.parent)


@pytest.mark.parametrize('module', [arrays, synthetic, registry, tfds_io])
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.failed == 0


def test_tfds_without_supervised_keys_is_refused():
  # A stand-in builder: `_read_array_record` must refuse before reading anything.
  class _Info:
    supervised_keys = None
    splits = {}

  class _Builder:
    info = _Info()

    def as_data_source(self, split):
      raise AssertionError('read before the supervised keys were checked')

  with pytest.raises(ValueError, match='supervised keys'):
    tfds_io._read_array_record(_Builder(), 'train', 'tfds stand-in')
