"""torchvision-layout weights in the Flax VGG-11, ResNet-18 and AlexNet, checked against torch.

torch is optional (`pip install torch`); torchvision is not needed: the reference models below
are plain `torch.nn` modules with torchvision's layer layout and state-dict names.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jconvrfm import models
from jconvrfm._src import pretrained
from tests import tolerances


def test_module_path_mapping():
  assert pretrained._module_path('features.3') == ('features_3',)
  assert pretrained._module_path('layer1.0.downsample.0') == ('layer1_0', 'downsample_0')
  assert pretrained._module_path('fc') == ('fc',)


def test_template_mismatch_raises():
  model = models.VGG(10, cfg=(4, 'M'), hidden=8, pool_size=(1, 1))
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
  sd = {'features.0.weight': np.zeros((4, 3, 3, 3), np.float32)}
  with pytest.raises(ValueError, match='missing'):
    pretrained.torchvision_to_flax(sd, template)


def test_imagenet_preprocess_shapes_and_normalisation():
  img = np.full((300, 400, 3), 255, np.uint8)
  x = pretrained.imagenet_preprocess(img)
  assert x.shape == (224, 224, 3) and x.dtype == np.float32
  np.testing.assert_allclose(x[0, 0], (1 - np.array(pretrained.IMAGENET_MEAN)) /
                             np.array(pretrained.IMAGENET_STD), rtol=1e-6)
  with pytest.raises(ValueError, match='image'):
    pretrained.imagenet_preprocess(np.zeros((10, 10), np.uint8))


# ----------------------------------------------------------------------------------------------
# torch references with torchvision's layout and names.
# ----------------------------------------------------------------------------------------------

def _torch_models():
  torch = pytest.importorskip('torch')
  tnn = torch.nn

  class VGG(tnn.Module):

    def __init__(self, cfg, batch_norm, hidden, num_classes):
      super().__init__()
      layers, c = [], 3
      for v in cfg:
        if v == 'M':
          layers.append(tnn.MaxPool2d(2, 2))
        else:
          layers.append(tnn.Conv2d(c, v, 3, padding=1))
          if batch_norm:
            layers.append(tnn.BatchNorm2d(v))
          layers.append(tnn.ReLU())
          c = v
      self.features = tnn.Sequential(*layers)
      self.avgpool = tnn.AdaptiveAvgPool2d((7, 7))
      self.classifier = tnn.Sequential(
          tnn.Linear(c * 49, hidden), tnn.ReLU(), tnn.Dropout(), tnn.Linear(hidden, hidden),
          tnn.ReLU(), tnn.Dropout(), tnn.Linear(hidden, num_classes))

    def forward(self, x):
      return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

  class BasicBlock(tnn.Module):

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = tnn.BatchNorm2d(cout)
      self.relu = tnn.ReLU()
      self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = tnn.BatchNorm2d(cout)
      self.downsample = None
      if stride != 1 or cin != cout:
        self.downsample = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False),
                                         tnn.BatchNorm2d(cout))

    def forward(self, x):
      y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
      return self.relu(y + (x if self.downsample is None else self.downsample(x)))

  class ResNet18(tnn.Module):

    def __init__(self, num_classes, width=64):
      super().__init__()
      self.conv1 = tnn.Conv2d(3, width, 7, 2, 3, bias=False)
      self.bn1 = tnn.BatchNorm2d(width)
      self.relu = tnn.ReLU()
      self.maxpool = tnn.MaxPool2d(3, 2, 1)
      c = width
      for s in range(4):
        cout = width * 2**s
        blocks = [BasicBlock(c, cout, 1 if s == 0 else 2), BasicBlock(cout, cout, 1)]
        setattr(self, f'layer{s + 1}', tnn.Sequential(*blocks))
        c = cout
      self.avgpool = tnn.AdaptiveAvgPool2d((1, 1))
      self.fc = tnn.Linear(c, num_classes)

    def forward(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      for s in range(4):
        x = getattr(self, f'layer{s + 1}')(x)
      return self.fc(torch.flatten(self.avgpool(x), 1))

  class AlexNet(tnn.Module):

    def __init__(self, num_classes, hidden):
      super().__init__()
      self.features = tnn.Sequential(
          tnn.Conv2d(3, 64, 11, 4, 2), tnn.ReLU(), tnn.MaxPool2d(3, 2),
          tnn.Conv2d(64, 192, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(3, 2),
          tnn.Conv2d(192, 384, 3, padding=1), tnn.ReLU(),
          tnn.Conv2d(384, 256, 3, padding=1), tnn.ReLU(),
          tnn.Conv2d(256, 256, 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(3, 2))
      self.avgpool = tnn.AdaptiveAvgPool2d((6, 6))
      self.classifier = tnn.Sequential(
          tnn.Dropout(), tnn.Linear(256 * 36, hidden), tnn.ReLU(), tnn.Dropout(),
          tnn.Linear(hidden, hidden), tnn.ReLU(), tnn.Linear(hidden, num_classes))

    def forward(self, x):
      return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

  return torch, VGG, ResNet18, AlexNet


def _randomise(torch, module, seed):
  """Random weights and non-trivial batch-norm statistics (as after training)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in module.state_dict().items():
      if name.endswith('num_batches_tracked'):
        continue
      if name.endswith('running_var'):
        t.copy_(0.5 + torch.rand(t.shape, generator=g))
      elif name.endswith('running_mean') or name.endswith('bias'):
        t.copy_(0.1 * torch.randn(t.shape, generator=g))
      elif name.endswith('weight') and t.ndim == 1:
        t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
      else:
        fan_in = int(np.prod(t.shape[1:]))
        t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in)**0.5)
  module.eval()
  return {k: v.numpy() for k, v in module.state_dict().items()}


VGG_SMALL = (8, 'M', 16, 'M', 32, 32, 'M', 32, 32, 'M', 32, 32, 'M')  # VGG-11 layout, narrow


@pytest.mark.parametrize('arch', ['vgg11', 'vgg11_bn', 'resnet18', 'alexnet'])
def test_logits_match_torch(arch, tmp_path):
  torch, VGG, ResNet18, AlexNet = _torch_models()
  torch.set_num_threads(1)
  if arch.startswith('vgg'):
    bn = arch == 'vgg11_bn'
    tmodel, size = VGG(VGG_SMALL, bn, 64, 10), 64  # 64x64: 2x2 maps before the 7x7 pool
    fmodel = models.VGG(10, cfg=VGG_SMALL, batch_norm=bn, hidden=64)
  elif arch == 'resnet18':
    tmodel, size = ResNet18(10, width=16), 64
    fmodel = models.resnet18(10, width=16)
  else:
    tmodel, size = AlexNet(10, hidden=64), 96  # full conv widths
    fmodel = models.AlexNet(10, hidden=64)
  state = _randomise(torch, tmodel, seed=0)
  # Round trip through the .npz format the converter writes.
  np.savez(tmp_path / 'sd.npz', **state)
  x = np.random.default_rng(0).normal(size=(3, size, size, 3)).astype(np.float32)
  template = jax.eval_shape(lambda: fmodel.init(jax.random.key(0), jnp.asarray(x[:1])))
  variables = pretrained.torchvision_to_flax(pretrained.load_npz(tmp_path / 'sd.npz'), template)
  got = np.asarray(fmodel.apply(variables, jnp.asarray(x), train=False))
  with torch.no_grad():
    want = tmodel(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  assert got.shape == want.shape == (3, 10)
  assert np.max(np.abs(got - want)) <= 1e-4 * max(1.0, np.max(np.abs(want))), (got, want)
  tolerances.assert_rel_fro(got, want, 1e-5, arch)


def test_full_size_resnet18_state_dict_fits():
  """A full-size torchvision-named ResNet-18 state dict fits `load_pretrained`'s template."""
  torch, _, ResNet18, _ = _torch_models()
  state = {k: v.numpy() for k, v in ResNet18(1000).state_dict().items()}
  model = pretrained.pretrained_model('resnet18')
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  variables = pretrained.torchvision_to_flax(state, template)
  assert variables['params']['layer4_1']['conv2']['kernel'].shape == (3, 3, 512, 512)


def test_convert_binary_report_on_jpeg_folder(tmp_path):
  """Step 2 of experiments/convert_torchvision.py end to end: a (random) ResNet-18 state dict
  in torchvision's names, a folder of JPEGs, the per-layer report."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from experiments import convert_torchvision  # pylint: disable=g-import-not-at-top
  torch, _, ResNet18, _ = _torch_models()
  np.savez(tmp_path / 'r18.npz', **_randomise(torch, ResNet18(1000), seed=1))
  rng = np.random.default_rng(0)
  (tmp_path / 'img' / 'a').mkdir(parents=True)
  for i, shape in enumerate([(240, 320, 3), (300, 260, 3)]):
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
        tmp_path / 'img' / 'a' / f'{i}.jpg')
  records = convert_torchvision.report('resnet18', str(tmp_path / 'r18.npz'),
                                       str(tmp_path / 'img'), str(tmp_path / 'out'),
                                       max_images=2, num_outputs=2, chunk_size=2, crop=64,
                                       layers=['layer1_1/conv1', 'layer2_0/conv1'])
  assert [r.name for r in records] == ['layer1_1/conv1', 'layer2_0/conv1']
  assert all(np.isfinite(r.corr_agop) for r in records)
  assert (tmp_path / 'out' / 'cnfa.json').is_file()
