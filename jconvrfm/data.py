"""Datasets for jconvrfm: tfds, image folders, npz files and synthetic local-signal tasks.

Import it explicitly (`import jconvrfm.data`); `import jconvrfm` does not. TensorFlow and
tensorflow-datasets are imported only when a tfds or image-folder loader is called, with
accelerators hidden from TensorFlow. Every loader returns a `Dataset(images (n, H, W, C)
float32, labels (n,) int32, num_classes)` held in host memory (numpy).

References:
  D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
  convolutional neural networks. arXiv:2309.00570, 2023 (section 5: the tasks).
"""

from jconvrfm._src.data.arrays import check_dataset
from jconvrfm._src.data.arrays import Dataset
from jconvrfm._src.data.arrays import load_npz
from jconvrfm._src.data.arrays import make_dataset
from jconvrfm._src.data.arrays import split
from jconvrfm._src.data.registry import load
from jconvrfm._src.data.registry import PREFIXES
from jconvrfm._src.data.registry import REGISTRY
from jconvrfm._src.data.registry import split_seed
from jconvrfm._src.data.synthetic import bars
from jconvrfm._src.data.synthetic import noisy_frame
from jconvrfm._src.data.synthetic import star
from jconvrfm._src.data.synthetic import star_mask
from jconvrfm._src.data.synthetic import toy_1d
from jconvrfm._src.data.tfds_io import load_image_folder
from jconvrfm._src.data.tfds_io import load_tfds
from jconvrfm._src.data.tfds_io import PINNED_VERSIONS
