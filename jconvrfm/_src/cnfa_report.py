"""Per-layer report of the Convolutional Neural Feature Ansatz for a Flax reference model.

For every analysed conv layer of a model built from `AnalysableConv` (see `jconvrfm.models`),
the report compares the layer's CNFM `W W^T` with the patch AGOP `G` of the network's logits at
that layer (all logits summed as separate outputs, positions summed, averaged over images):

* `G` in closed form, `W Sigma W^T` (`jconvrfm.conv_agop`) from the gradients of every logit
  w.r.t. the layer's pre-activation (before bias), all layers from one reverse pass per logit;
* optionally `G` in generic form, by autodiff through the explicit patch tensor of the layer's
  input (the model run with `generic=True`), to check the two agree;
* Pearson (centered) and cosine (uncentered) correlations of the CNFM with `G` and with
  `G^(1/2)`, at the trained and (if given) the initial weights, and the baseline
  corr(initial CNFM, trained CNFM).

Images are processed in chunks of `chunk_size`, so memory holds at most one chunk's gradients;
the chunks are spread over the devices of every process (`processes.DeviceAccumulators`).

References:
  D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
  convolutional neural networks. arXiv:2309.00570, 2023.
"""

import functools
import json
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jconvrfm._src import agop as agop_lib
from jconvrfm._src import checks
from jconvrfm._src import cnfa
from jconvrfm._src import processes
from jconvrfm._src.models import analysis
from jconvrfm._src.models import layers

Variables = Mapping[str, Any]


class LayerRecord(NamedTuple):
  """CNFA measures of one conv layer (correlations are Python floats in [-1, 1], or None where
  undefined: a constant matrix, e.g. the zero AGOP of a layer the logits do not depend on).

  Attributes:
    name: layer name (module path, e.g. `'conv_0'`, `'layer1_0/conv1'`).
    kernel_shape: `(q, q, c, k)`.
    corr_agop, cos_agop: centered (Pearson) and uncentered correlation of the trained CNFM
      with the patch AGOP `G` at the trained weights.
    corr_sqrt_agop, cos_sqrt_agop: the same against `G^(1/2)`.
    init_corr_agop, init_cos_agop, init_corr_sqrt_agop, init_cos_sqrt_agop: CNFM vs AGOP, both
      at the initial weights (None without initial weights).
    baseline_corr, baseline_cos: correlation of the initial CNFM with the trained CNFM
      (None without initial weights).
    generic_rel_error: relative Frobenius error between the closed-form and the generic AGOP
      at the trained weights (None unless `generic=True`).
  """
  name: str
  kernel_shape: Tuple[int, ...]
  corr_agop: Optional[float]
  cos_agop: Optional[float]
  corr_sqrt_agop: Optional[float]
  cos_sqrt_agop: Optional[float]
  init_corr_agop: Optional[float] = None
  init_cos_agop: Optional[float] = None
  init_corr_sqrt_agop: Optional[float] = None
  init_cos_sqrt_agop: Optional[float] = None
  baseline_corr: Optional[float] = None
  baseline_cos: Optional[float] = None
  generic_rel_error: Optional[float] = None


def _chunks(n: int, chunk_size: int):
  for i in range(0, n, chunk_size):
    yield i, min(i + chunk_size, n)


def layer_agops(model: nn.Module,
                variables: Variables,
                images: jax.Array,
                *,
                chunk_size: int = 32,
                layer_names: Optional[Sequence[str]] = None,
                outputs: Optional[Sequence[int]] = None,
                generic: bool = False,
                devices: Optional[Sequence[jax.Device]] = None) -> Dict[str, jax.Array]:
  """Patch AGOPs `(d, d)` of the model's logits at every analysed conv layer.

  `G = (1/n) sum_x sum_ij sum_o grad_{p_ij} f_o(x) grad_{p_ij} f_o(x)^T`, with the model in
  inference mode (batch-norm running statistics, no dropout).

  Args:
    model: a reference model built from `AnalysableConv` (any `generic` setting).
    variables: `{'params': ..., ['batch_stats': ...]}`.
    images: `(n, H, W, c)` floating, finite.
    chunk_size: images per chunk (bounds memory: one chunk holds
      `chunk_size * n_outputs * sum_l H'_l W'_l k_l` gradient entries, times `d_l / k_l` in
      generic mode).
    layer_names: layers to report (default: all analysed layers).
    outputs: logit indices summed in the AGOP (default: all logits).
    generic: compute `G` by autodiff through the explicit patch tensors (the model is cloned
      with `generic=True`) instead of the closed form `W Sigma W^T`.
    devices: devices the chunks are spread over (`processes.DeviceAccumulators`: each chunk
      to the least loaded device, their sums added); default every local accelerator, or the
      first CPU device, of every process. Devices of several processes make this a
      collective (every process calls it with the same arguments; each computes its share of
      the chunks, and every process receives the same sums); a list of this process's
      devices computes everything in this process.

  Returns:
    `{layer_name: G}`, each `(d, d)` with `d = q*q*c` in Flax kernel order, in the promoted
    dtype of images and parameters, on this process's first device in `devices`.

  >>> import jax, jax.numpy as jnp
  >>> from jconvrfm.models import VanillaCNN
  >>> m = VanillaCNN(num_classes=3, width=4, depth=2)
  >>> x = jnp.ones((2, 8, 8, 1))
  >>> v = m.init(jax.random.key(0), x)
  >>> {k: g.shape for k, g in layer_agops(m, v, x).items()}
  {'conv_0': (9, 9), 'conv_1': (36, 36)}
  """
  images = checks.check_nhwc(images, 'images')
  chunk_size = checks.check_positive_int(chunk_size, 'chunk_size')
  devices = processes.devices_or_default(devices)
  variables = processes.local_replica(
      {k: v for k, v in variables.items() if k != layers.PERTURBATIONS})
  names = analysis.analysed_layers(model, variables, images[:1])
  if layer_names is not None:
    unknown = set(layer_names) - set(names)
    if unknown:
      raise ValueError(f'`layer_names` {sorted(unknown)} are not analysed layers of the model; '
                       f'available: {list(names)}.')
    names = tuple(n for n in names if n in layer_names)
  chunk_agops = _chunk_agops_fn(model.clone(generic=generic), generic, tuple(names),
                                None if outputs is None else tuple(int(o) for o in outputs))

  n = images.shape[0]
  work = processes.DeviceAccumulators(devices)
  for lo, hi in _chunks(n, chunk_size):
    dev = work.assign(hi - lo)
    if work.local(dev):   # otherwise another process's chunk
      part = chunk_agops(work.put(dev, 'variables', lambda: variables),
                         jax.device_put(images[lo:hi], work.devices[dev]))
      work.add(dev, 'agop', {k: v * ((hi - lo) / n) for k, v in part.items()})
  # A process without a chunk (fewer chunks than devices) adds zeros.
  zeros = lambda: jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                               jax.eval_shape(chunk_agops, variables, images[:1]))
  return work.gather('agop', zeros)


@functools.lru_cache(maxsize=16)
def _chunk_agops_fn(model: nn.Module, generic: bool, names: Tuple[str, ...],
                    outputs: Optional[Tuple[int, ...]]):
  """Jitted `(variables, images_chunk) -> {name: AGOP of the chunk}`, one per configuration
  (Flax modules hash by their fields), so repeated reports do not recompile."""
  kind = layers.PATCHES if generic else layers.PREACT

  @jax.jit
  def chunk_agops(variables, x):
    grads = analysis.logit_gradients(model, variables, x, kind=kind, layer_names=names,
                                     outputs=outputs)
    out = {}
    for name in names:
      g = grads[name]
      if generic:
        flat = g.reshape(-1, g.shape[-1])
        a = jnp.matmul(flat.T, flat, precision=jax.lax.Precision.HIGHEST) / x.shape[0]
        out[name] = (a + a.T) / 2
      else:
        out[name] = agop_lib.conv_agop(analysis.layer_kernel(variables['params'], name), g)
    return out

  return chunk_agops


def _corr(a, b, centered: bool) -> Optional[float]:
  """`jconvrfm.correlation`, or None where it is undefined (a constant or all-zero matrix,
  e.g. the AGOP of a layer the logits do not depend on because every ReLU after it is dead)."""
  for m in (a, b):
    m = np.asarray(m)
    if (np.ptp(m) == 0) if centered else not np.any(m):
      return None
  return float(cnfa.correlation(a, b, centered))


def _measures(kernel, g) -> Tuple[Optional[float], ...]:
  m = cnfa.cnfm(kernel)
  g = g.astype(m.dtype)
  s = cnfa.sqrt_psd(g)
  return (_corr(m, g, True), _corr(m, g, False), _corr(m, s, True), _corr(m, s, False))


def cnfa_report(model: nn.Module,
                variables: Variables,
                images: jax.Array,
                *,
                initial_variables: Optional[Variables] = None,
                chunk_size: int = 32,
                layer_names: Optional[Sequence[str]] = None,
                outputs: Optional[Sequence[int]] = None,
                generic: bool = False,
                devices: Optional[Sequence[jax.Device]] = None) -> List[LayerRecord]:
  """Per-layer CNFA report: CNFM vs patch AGOP (and its square root), trained and at init.

  Args:
    model: a reference model built from `AnalysableConv`.
    variables: trained `{'params': ..., ['batch_stats': ...]}`.
    images: `(n, H, W, c)` images over which the AGOP is averaged.
    initial_variables: the same model's variables at initialisation; adds the at-init measures
      and the baseline corr(initial CNFM, trained CNFM).
    chunk_size, layer_names, outputs, devices: see `layer_agops` (with devices of several
      processes every process calls this and receives the same records).
    generic: also compute the generic AGOP (autodiff through explicit patches) at the trained
      weights and record its relative Frobenius distance to the closed form.

  Returns:
    One `LayerRecord` per analysed layer, in forward order.

  >>> import jax, jax.numpy as jnp
  >>> from jconvrfm.models import VanillaCNN
  >>> m = VanillaCNN(num_classes=3, width=4, depth=2)
  >>> x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  >>> v = m.init(jax.random.key(0), x)
  >>> [r.name for r in cnfa_report(m, v, x)]
  ['conv_0', 'conv_1']
  """
  kw = dict(chunk_size=chunk_size, layer_names=layer_names, outputs=outputs, devices=devices)
  variables = processes.local_replica(variables)
  g_trained = layer_agops(model, variables, images, **kw)
  g_init = (layer_agops(model, initial_variables, images, **kw)
            if initial_variables is not None else None)
  g_generic = layer_agops(model, variables, images, generic=True, **kw) if generic else None
  records = []
  for name, g in g_trained.items():
    kernel = analysis.layer_kernel(variables['params'], name)
    fields = dict(zip(('corr_agop', 'cos_agop', 'corr_sqrt_agop', 'cos_sqrt_agop'),
                      _measures(kernel, g)))
    if g_init is not None:
      k0 = analysis.layer_kernel(initial_variables['params'], name)
      fields.update(zip(('init_corr_agop', 'init_cos_agop', 'init_corr_sqrt_agop',
                         'init_cos_sqrt_agop'), _measures(k0, g_init[name])))
      m, m0 = cnfa.cnfm(kernel), cnfa.cnfm(k0).astype(kernel.dtype)
      fields['baseline_corr'] = _corr(m0, m, True)
      fields['baseline_cos'] = _corr(m0, m, False)
    if g_generic is not None:
      a = np.asarray(g, np.float64)
      b = np.asarray(g_generic[name], np.float64)
      fields['generic_rel_error'] = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-300))
    if fields['corr_agop'] is None:
      logging.warning('Layer %s: the patch AGOP is constant (the logits do not depend on this '
                      'layer, e.g. all ReLUs after it are dead); its correlations are None.',
                      name)
    records.append(LayerRecord(name=name, kernel_shape=tuple(int(s) for s in kernel.shape),
                               **fields))
  return records


def to_json(records: Sequence[LayerRecord], indent: Optional[int] = 2) -> str:
  """JSON text of a report: a list of per-layer objects with the `LayerRecord` fields."""
  return json.dumps([r._asdict() for r in records], indent=indent)


def from_json(text: str) -> List[LayerRecord]:
  """Inverse of `to_json`."""
  out = []
  for d in json.loads(text):
    d['kernel_shape'] = tuple(d['kernel_shape'])
    out.append(LayerRecord(**d))
  return out


def markdown_table(records: Sequence[LayerRecord]) -> str:
  """A markdown table of a report (centered correlations; uncentered in parentheses)."""
  fmt = lambda v: '-' if v is None else f'{v:.3f}'
  rows = ['| layer | kernel | corr(CNFM, G) | corr(CNFM, G^1/2) | at init: corr(CNFM, G) | '
          'baseline corr(CNFM_0, CNFM) |', '|---|---|---|---|---|---|']
  for r in records:
    rows.append(f'| {r.name} | {"x".join(map(str, r.kernel_shape))} | '
                f'{fmt(r.corr_agop)} ({fmt(r.cos_agop)}) | '
                f'{fmt(r.corr_sqrt_agop)} ({fmt(r.cos_sqrt_agop)}) | '
                f'{fmt(r.init_corr_agop)} ({fmt(r.init_cos_agop)}) | '
                f'{fmt(r.baseline_corr)} ({fmt(r.baseline_cos)}) |')
  return '\n'.join(rows)
