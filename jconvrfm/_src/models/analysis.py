"""Access to the analysed conv layers of a reference model: names, kernels, logit gradients.

A model built from `AnalysableConv` registers, for every analysed conv, a zero perturbation of
its pre-activation (`'preact'`, before the bias) and, in generic mode, of its explicit patch
tensor (`'patches'`). The functions here find those layers and return the gradients of every
logit w.r.t. them for all layers in one reverse pass per logit (the reverse passes are
vmapped over logits).

Layer names are module paths joined by `/`, e.g. `'conv_0'` or `'layer2_0/conv1'`.
"""

import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jconvrfm._src.models import layers

Variables = Mapping[str, Any]


def _strip(variables: Variables) -> Dict[str, Any]:
  return {k: v for k, v in variables.items() if k != layers.PERTURBATIONS}


def zero_perturbations(model: nn.Module, variables: Variables, x: jax.Array) -> Any:
  """Zero perturbations (pytree mirroring the module tree) for a batch `x` `(n, H, W, c)`.

  Leaves: `'preact'` `(n, H', W', k)` and, in generic mode, `'patches'` `(n, H', W', d)`, in
  the dtype of the corresponding intermediate.
  """
  def run(v, x):
    _, state = model.apply(v, x, train=False, mutable=[layers.PERTURBATIONS])
    return state[layers.PERTURBATIONS]
  shapes = jax.eval_shape(run, _strip(variables), x)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def analysed_layers(model: nn.Module, variables: Variables, x: jax.Array) -> Tuple[str, ...]:
  """Names of the analysed conv layers in forward order (e.g. `('conv_0', 'conv_1')`).

  `x` is an example batch (one image suffices); only shapes are traced.
  """
  def run(v, x):
    _, state = model.apply(v, x, train=False, mutable=[layers.PERTURBATIONS])
    return state[layers.PERTURBATIONS]
  shapes = jax.eval_shape(run, _strip(variables), x[:1])
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
  names = [layers.layer_name(k[:-1]) for k in flat if k[-1] == layers.PREACT]
  return tuple(sorted(names, key=_natural_key))


def _natural_key(name: str):
  """'features_11' sorts after 'features_4' (pytree flattening sorts names as strings)."""
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]


def layer_kernel(params: Mapping[str, Any], name: str) -> jax.Array:
  """The kernel `(q, q, c, k)` (Flax HWIO) of the conv layer `name` (e.g. `'layer1_0/conv1'`)."""
  node = params
  for part in name.split('/'):
    if part not in node:
      raise ValueError(f'no layer {name!r} in `params` (missing {part!r}).')
    node = node[part]
  if 'kernel' not in node:
    raise ValueError(f'layer {name!r} has no kernel.')
  return node['kernel']


def logit_gradients(model: nn.Module,
                    variables: Variables,
                    x: jax.Array,
                    *,
                    kind: str = layers.PREACT,
                    layer_names: Optional[Sequence[str]] = None,
                    outputs: Optional[Sequence[int]] = None) -> Dict[str, jax.Array]:
  """Gradients of each logit w.r.t. every analysed layer's pre-activation or patch tensor.

  The model runs in inference mode (`train=False`: batch-norm running statistics, no dropout),
  so examples are independent and one reverse pass per logit gives all per-example gradients.

  Args:
    model: a reference model built from `AnalysableConv` (for `kind='patches'`, constructed
      with `generic=True`).
    variables: `{'params': ..., ['batch_stats': ...]}`.
    x: images `(n, H, W, c)`.
    kind: `'preact'` (gradients `delta` w.r.t. the pre-activation before bias) or `'patches'`
      (gradients w.r.t. the explicit patches).
    layer_names: restrict the output to these layers (default: all analysed layers).
    outputs: logit indices to differentiate (default: all).

  Returns:
    `{layer_name: grads}` with grads of shape `(n, n_outputs, H', W', k)` for `'preact'` or
    `(n, n_outputs, H', W', d)` for `'patches'`, in the intermediate's dtype.
  """
  if kind not in (layers.PREACT, layers.PATCHES):
    raise ValueError(f"`kind` must be 'preact' or 'patches', got {kind!r}.")
  variables = _strip(variables)
  perts = zero_perturbations(model, variables, x)

  def f(p):
    return model.apply({**variables, layers.PERTURBATIONS: p}, x, train=False)

  logits, vjp = jax.vjp(f, perts)
  n, n_logits = logits.shape
  idx = jnp.arange(n_logits) if outputs is None else jnp.asarray(outputs)
  cts = jnp.broadcast_to(jax.nn.one_hot(idx, n_logits, dtype=logits.dtype)[:, None, :],
                         (idx.shape[0], n, n_logits))
  grads = jax.vmap(lambda ct: vjp(ct)[0])(cts)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(grads))
  out = {}
  for key, g in flat.items():
    if key[-1] != kind:
      continue
    name = layers.layer_name(key[:-1])
    if layer_names is None or name in layer_names:
      out[name] = jnp.moveaxis(g, 0, 1)
  if layer_names is not None:
    missing = set(layer_names) - set(out)
    if missing:
      raise ValueError(f'`layer_names` not found among analysed layers ({kind}): '
                       f'{sorted(missing)}.')
  return out
