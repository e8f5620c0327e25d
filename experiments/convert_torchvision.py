r"""Convert torchvision ImageNet weights to `.npz`, and run the CNFA report on a JPEG folder.

Step 1 (a machine with torchvision and internet access):

  python -m experiments.convert_torchvision --arch=vgg11 --npz=/tmp/vgg11.npz

saves `torchvision.models.get_model(arch, weights='DEFAULT').state_dict()` as a plain `.npz`
of numpy arrays keyed by the torch names (no pickles). Nothing else needs torch.

Step 2 (anywhere; JAX only):

  python -m experiments.convert_torchvision --arch=vgg11 --npz=/tmp/vgg11.npz \
    --images=/path/to/jpegs --max_images=64 --workdir=/tmp/cnfa_vgg11

loads the `.npz` into the Flax model (`jconvrfm._src.pretrained`), preprocesses the images as
torchvision does (resize 256, center crop 224, ImageNet mean/std), and writes the per-layer
CNFA report (`cnfa.json`, `cnfa.md`) of the pretrained network: corr(CNFM, patch AGOP) per
analysed conv, the AGOP summed over `--num_outputs` logits (the 1000 ImageNet logits cost one
reverse pass each; a GPU is advisable for all of them).

References:
  D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
  convolutional neural networks. arXiv:2309.00570, 2023 (the ImageNet AlexNet/VGG/ResNet
  evidence).
"""

import json
import pathlib
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

import experiments
from jconvrfm._src import cnfa_report as report_lib
from jconvrfm._src import pretrained

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this binary's flags (only when run as a program, so that importing the module
  beside other binaries, as the tests do, defines no clashing flags)."""
  flags.DEFINE_enum('arch', 'vgg11', sorted(pretrained.ARCHITECTURES), 'torchvision model')
  flags.DEFINE_string('npz', None, 'converted state dict (written if absent)', required=True)
  flags.DEFINE_string('images', None, 'folder of JPEG/PNG images for the CNFA report')
  flags.DEFINE_integer('max_images', 64, 'images used for the AGOP')
  flags.DEFINE_integer('num_outputs', 1000, 'logits summed in the AGOP (the first ones)')
  flags.DEFINE_integer('chunk_size', 4, 'images per AGOP chunk')
  flags.DEFINE_list('layers', None, 'analysed layers to report (default: all); the deep layers '
                    'of VGG/ResNet have d = 4608, where G^(1/2) takes an eigendecomposition')
  flags.DEFINE_integer('crop', 224, 'center-crop size (images are resized to 256/224 * crop)')
  flags.DEFINE_string('workdir', None, 'output folder for the report')


def convert(arch: str, path: str) -> None:
  """Downloads torchvision's default ImageNet weights of `arch` and saves them as `.npz`."""
  import torchvision  # pylint: disable=g-import-not-at-top
  model = torchvision.models.get_model(arch, weights='DEFAULT')
  state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
  np.savez(path, **state)
  logging.info('Saved %d arrays of %s to %s.', len(state), arch, path)


def report(arch: str, npz: str, images: str, workdir: str, *, max_images: int,
           num_outputs: int, chunk_size: int, crop: int = 224, layers=None):
  """Per-layer CNFA report of a pretrained network on a folder of images."""
  model, variables = pretrained.load_pretrained(arch, npz)
  x = pretrained.load_jpeg_folder(images, max_images=max_images, crop=crop)
  logging.info('%d images %s', x.shape[0], x.shape)
  t = time.time()
  records = report_lib.cnfa_report(model, variables, x, chunk_size=chunk_size,
                                   outputs=list(range(num_outputs)), layer_names=layers)
  out = pathlib.Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'cnfa.json').write_text(report_lib.to_json(records))
  (out / 'cnfa.md').write_text(report_lib.markdown_table(records) + '\n')
  (out / 'config.json').write_text(json.dumps(
      {'arch': arch, 'npz': npz, 'images': images, 'n_images': int(x.shape[0]),
       'num_outputs': num_outputs, 'time_s': time.time() - t}, indent=2))
  logging.info('\n%s', report_lib.markdown_table(records))
  return records


def main(argv) -> None:
  del argv
  if not pathlib.Path(FLAGS.npz).exists():
    convert(FLAGS.arch, FLAGS.npz)
  if FLAGS.images:
    if not FLAGS.workdir:
      raise app.UsageError('--workdir is required with --images.')
    report(FLAGS.arch, FLAGS.npz, FLAGS.images, FLAGS.workdir, max_images=FLAGS.max_images,
           num_outputs=FLAGS.num_outputs, chunk_size=FLAGS.chunk_size, crop=FLAGS.crop,
           layers=FLAGS.layers)


if __name__ == '__main__':
  experiments.use_jax_flags()
  define_flags()
  app.run(main)
