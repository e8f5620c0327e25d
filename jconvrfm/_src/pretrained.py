"""torchvision ImageNet weights for the Flax VGG-11, ResNet-18 and AlexNet, and ImageNet inputs.

`experiments/convert_torchvision.py` (run where torchvision and the internet are available)
saves a torchvision `state_dict` as a plain `.npz` of arrays keyed by the torch names
(`features.0.weight`, `layer1.0.bn1.running_mean`, ...). `torchvision_to_flax` maps such a
dict onto the Flax reference models, whose module names are the torch names with `.` before an
index replaced by `_`:

* conv weights OIHW -> Flax HWIO (`kernel`); Linear weights `(out, in)` -> `(in, out)`;
* the first Linear after the spatial flatten (VGG `classifier.0`, AlexNet `classifier.1`) reads
  torch's NCHW flatten order `c*H*W + h*W + w`; its input axis is permuted to Flax's NHWC order
  `h*W*C + w*C + c`;
* batch norm `weight`/`bias` -> params `scale`/`bias`, `running_mean`/`running_var` ->
  `batch_stats` `mean`/`var` (`num_batches_tracked` is dropped). Epsilon 1e-5 as in torch.

Nothing here reads files implicitly: the caller passes paths.

References:
  torchvision.models (vgg11, vgg11_bn, resnet18, alexnet) and their ImageNet weights;
  ImageNet preprocessing of the torchvision model zoo (resize 256, center crop 224,
  mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)).
"""

import os
import pathlib
import re
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jconvrfm._src.models import alexnet as alexnet_lib
from jconvrfm._src.models import resnet as resnet_lib
from jconvrfm._src.models import vgg as vgg_lib

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ARCHITECTURES = {
    'vgg11': lambda num_classes: vgg_lib.vgg11(num_classes),
    'vgg11_bn': lambda num_classes: vgg_lib.vgg11(num_classes, batch_norm=True),
    'resnet18': lambda num_classes: resnet_lib.resnet18(num_classes),
    'alexnet': lambda num_classes: alexnet_lib.AlexNet(num_classes),
}

# The Linear that follows the spatial flatten, per architecture family (Flax module name).
_FLATTEN_LINEAR = ('classifier_0', 'classifier_1')


def pretrained_model(arch: str, num_classes: int = 1000) -> nn.Module:
  """The Flax model (`'vgg11'`, `'vgg11_bn'`, `'resnet18'`, `'alexnet'`) in torchvision layout."""
  if arch not in ARCHITECTURES:
    raise ValueError(f'`arch` must be one of {sorted(ARCHITECTURES)}, got {arch!r}.')
  return ARCHITECTURES[arch](num_classes)


def load_npz(path: Union[str, os.PathLike]) -> Dict[str, np.ndarray]:
  """Reads a converted state dict (`{torch_name: array}`) from `path`."""
  with np.load(path, allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def _module_path(torch_prefix: str) -> Tuple[str, ...]:
  """'layer1.0.downsample.0' -> ('layer1_0', 'downsample_0'); 'features.3' -> ('features_3',)."""
  out = []
  for token in torch_prefix.split('.'):
    if token.isdigit():
      if not out:
        raise ValueError(f'cannot map torch module name {torch_prefix!r}.')
      out[-1] = f'{out[-1]}_{token}'
    else:
      out.append(token)
  return tuple(out)


def torchvision_to_flax(state_dict: Mapping[str, Any],
                        template: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """Maps a torchvision `state_dict` (arrays keyed by torch names) to Flax variables.

  Args:
    state_dict: `{name: array}` with torch layouts (conv OIHW, Linear `(out, in)`), e.g. from
      `load_npz`. Arrays may be numpy arrays or anything `np.asarray` accepts.
    template: optional Flax variables (or their `jax.eval_shape`) of the target model; every
      name and shape is then checked, and missing, unexpected or mis-shaped entries raise.

  Returns:
    `{'params': ..., 'batch_stats': ...}` (no `batch_stats` key if there is no batch norm),
    float arrays as numpy, dtype as stored.

  >>> import numpy as np
  >>> sd = {'features.0.weight': np.zeros((8, 3, 3, 3)), 'features.0.bias': np.zeros(8)}
  >>> v = torchvision_to_flax(sd)
  >>> v['params']['features_0']['kernel'].shape
  (3, 3, 3, 8)
  """
  params: Dict[Tuple[str, ...], np.ndarray] = {}
  stats: Dict[Tuple[str, ...], np.ndarray] = {}
  # Output channels of the last conv before the flatten, for the NCHW -> NHWC permutation.
  conv_channels = [np.asarray(v).shape[0] for k, v in state_dict.items()
                   if k.startswith('features.') and np.asarray(v).ndim == 4]
  for name, value in state_dict.items():
    value = np.asarray(value)
    prefix, _, leaf = name.rpartition('.')
    if leaf == 'num_batches_tracked':
      continue
    path = _module_path(prefix)
    if leaf == 'weight' and value.ndim == 4:
      params[path + ('kernel',)] = np.transpose(value, (2, 3, 1, 0))
    elif leaf == 'weight' and value.ndim == 2:
      w = value.T  # (in, out)
      if path[-1] in _FLATTEN_LINEAR and conv_channels:
        c = conv_channels[-1]
        hw = w.shape[0] // c
        side = int(round(hw**0.5))
        if c * side * side != w.shape[0]:
          raise ValueError(f'{name}: input size {w.shape[0]} is not C*H*H with C = {c}.')
        w = w.reshape(c, side, side, -1).transpose(1, 2, 0, 3).reshape(w.shape[0], -1)
      params[path + ('kernel',)] = w
    elif leaf == 'weight' and value.ndim == 1:  # batch norm
      params[path + ('scale',)] = value
    elif leaf == 'bias':
      params[path + ('bias',)] = value
    elif leaf == 'running_mean':
      stats[path + ('mean',)] = value
    elif leaf == 'running_var':
      stats[path + ('var',)] = value
    else:
      raise ValueError(f'`state_dict`: do not know how to map {name!r} {value.shape}.')
  out = {'params': flax.traverse_util.unflatten_dict(params)}
  if stats:
    out['batch_stats'] = flax.traverse_util.unflatten_dict(stats)
  if template is not None:
    _check_against(out, template)
  return out


def _check_against(variables, template) -> None:
  for col in ('params', 'batch_stats'):
    want = flax.traverse_util.flatten_dict(flax.core.unfreeze(template.get(col, {})))
    got = flax.traverse_util.flatten_dict(variables.get(col, {}))
    missing = sorted('/'.join(k) for k in set(want) - set(got))
    extra = sorted('/'.join(k) for k in set(got) - set(want))
    shapes = sorted(f'{"/".join(k)}: {got[k].shape} vs {tuple(want[k].shape)}'
                    for k in set(got) & set(want) if tuple(got[k].shape) != tuple(want[k].shape))
    if missing or extra or shapes:
      raise ValueError(f'`state_dict` does not fit the model ({col}): missing {missing}, '
                       f'unexpected {extra}, shape mismatches {shapes}.')


def load_pretrained(arch: str, npz_path: Union[str, os.PathLike],
                    num_classes: int = 1000) -> Tuple[nn.Module, Dict[str, Any]]:
  """`(model, variables)` for a torchvision architecture from a converted `.npz` state dict."""
  model = pretrained_model(arch, num_classes)
  template = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3), jnp.float32)))
  variables = torchvision_to_flax(load_npz(npz_path), template)
  return model, jax.tree.map(jnp.asarray, variables)


def imagenet_preprocess(image: np.ndarray, *, resize: int = 256, crop: int = 224) -> np.ndarray:
  """One RGB image `(H, W, 3)` uint8 -> `(crop, crop, 3)` float32, torchvision-style.

  Resizes the shorter side to `resize` (PIL bilinear with antialiasing, as torchvision's
  `Resize` on PIL images), center-crops `crop` x `crop`, scales to [0, 1] and normalises with the
  ImageNet mean and std. Output layout HWC (stack to NHWC).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f'`image` must be uint8 of shape (H, W, 3), got {image.dtype} '
                     f'{image.shape}.')
  h, w = image.shape[:2]
  scale = resize / min(h, w)
  size = (max(resize, int(w * scale)), max(resize, int(h * scale)))  # PIL: (width, height)
  pil = Image.fromarray(image).resize(size, Image.BILINEAR)
  x = np.asarray(pil, np.float32) / 255.0
  top = int(round((x.shape[0] - crop) / 2.0))
  left = int(round((x.shape[1] - crop) / 2.0))
  x = x[top:top + crop, left:left + crop]
  return (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)


def load_jpeg_folder(root: Union[str, os.PathLike], *, max_images: Optional[int] = None,
                     crop: int = 224) -> np.ndarray:
  """All `*.jpg`/`*.jpeg`/`*.png` under `root` (sorted, recursive), ImageNet-preprocessed.

  Images are resized to `round(crop * 256 / 224)` on the shorter side and center-cropped to
  `crop` (torchvision's 256/224 for the default).

  Returns:
    `(n, crop, crop, 3)` float32 NHWC.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(root)
  if not root.is_dir():
    raise ValueError(f'`root`: no such folder: {str(root)!r}.')
  files = sorted(p for p in root.rglob('*') if re.search(r'\.(jpe?g|png)$', p.name, re.I))
  if max_images is not None:
    files = files[:max_images]
  if not files:
    raise ValueError(f'`root`: no JPEG/PNG images under {str(root)!r}.')
  resize = int(round(crop * 256 / 224))
  out = [imagenet_preprocess(np.asarray(Image.open(f).convert('RGB')), resize=resize, crop=crop)
         for f in files]
  return np.stack(out)
