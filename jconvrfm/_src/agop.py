"""Patch AGOP (average gradient outer product w.r.t. image patches), generic and closed form.

For a function `f` with outputs `f_o` of an input whose q x q patches `p_ij` are treated as
independent variables (overlapping patches are separate copies), the patch AGOP is the d x d
matrix

  `G = (1/n) sum_x sum_ij sum_o grad_{p_ij} f_o(x) grad_{p_ij} f_o(x)^T`,    d = q*q*c,

with patch vectors in Flax kernel order (feature index `(u*q + v)*c + ch`, see
`jconvrfm.patches`). Two implementations of the same quantity, with identical options:

* `patch_agop`: generic, by automatic differentiation of a user function through an explicit
  patch tensor `(n, H', W', d)`; chunked over examples so that at most `chunk_size` per-example
  Jacobians `(k, H', W', d)` are held at once.
* `conv_agop`: closed form for a conv layer inside a network. If the layer computes the
  pre-activation `z_ij = W^T p_ij` (+ bias) with `W = kernel.reshape(d, k)`, the chain rule gives
  `grad_{p_ij} f_o = W delta_{o,ij}` with `delta_{o,ij} = d f_o / d z_ij` (k,), hence
  `G = W Sigma W^T`, `Sigma = (1/n) sum_x sum_ij sum_o delta delta^T` (k x k).

Options (same meaning in both):

* `reduce_positions`: `'sum'` (the definition above) or `'mean'` (divide by the number of
  positions `H' W'`).
* `centered`: subtract, for every output `o` and position `ij`, the mean gradient over the
  examples: `G_c = (1/n) sum_x sum_ij sum_o (g - gbar)(g - gbar)^T
  = G - sum_ij sum_o gbar_{o,ij} gbar_{o,ij}^T`, with `g = grad_{p_ij} f_o(x)` and
  `gbar_{o,ij} = (1/n) sum_x grad_{p_ij} f_o(x)` (the covariance of the patch gradients).
  In closed form `gbar = W dbar` with `dbar_{o,ij} = mean_x delta_{o,ij}`.
* `power`: apply the PSD matrix power `G^power` (`jconvrfm.matrix_power_psd`: eigenvalues of
  the symmetric result clipped at zero, then raised to `power`). `power=1` (the paper) returns
  `G` unchanged (no clipping); `power=0.5` is the square root used in later work and ConvRFM.

Both results are exactly symmetric (`(G + G^T) / 2` of the accumulated sum).

References:
  D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
  convolutional neural networks. arXiv:2309.00570, 2023.
  A. Radhakrishnan, D. Beaglehole, P. Pandit, M. Belkin. Mechanism for feature learning in
  neural networks and backpropagation-free machine learning models. Science 383, 2024 (AGOP).
"""

import functools
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jconvrfm._src import checks
from jconvrfm._src import cnfa

_HIGHEST = jax.lax.Precision.HIGHEST

# With `chunk_size=None`, `patch_agop` holds per-example Jacobians of at most this many bytes
# per chunk (at least one example per chunk).
DEFAULT_CHUNK_BYTES = 64 * 2**20

_REDUCTIONS = ('sum', 'mean')


def _check_options(centered, power, reduce_positions) -> Tuple[bool, float, str]:
  if not isinstance(centered, (bool, np.bool_)):
    raise TypeError(f'`centered` must be a bool, got {centered!r}.')
  if isinstance(power, bool) or not isinstance(power, (int, float, np.integer, np.floating)):
    raise TypeError(f'`power` must be a Python float > 0, got {power!r}.')
  if not np.isfinite(power) or power <= 0:
    raise ValueError(f'`power` must be a finite float > 0, got {power!r}.')
  if not isinstance(reduce_positions, str) or reduce_positions.lower() not in _REDUCTIONS:
    raise ValueError(
        f'`reduce_positions` must be one of {list(_REDUCTIONS)}, got {reduce_positions!r}.')
  return bool(centered), float(power), reduce_positions.lower()


def _finish(g: jax.Array, mean_grads: Optional[jax.Array], num_positions: int,
            power: float, reduce_positions: str) -> jax.Array:
  """Centring, position reduction and power; `g` is already divided by n."""
  if mean_grads is not None:
    m = mean_grads.reshape(-1, g.shape[0])
    g = g - jnp.matmul(m.T, m, precision=_HIGHEST)
  g = (g + g.T) / 2
  if reduce_positions == 'mean':
    g = g / num_positions
  if power != 1.0:
    g = cnfa.matrix_power_psd(g, power)
    g = (g + g.T) / 2
  return g


# ----------------------------------------------------------------------------------------------
# Generic patch AGOP by autodiff through the explicit patch tensor.
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=('fn', 'chunk_size', 'centered', 'forward'))
def _patch_agop_sums(fn: Callable[..., jax.Array], patch_tensor: jax.Array, args: Tuple[Any, ...],
                     chunk_size: int, centered: bool,
                     forward: bool) -> Tuple[jax.Array, Optional[jax.Array]]:
  """`sum_x J_x^T J_x` (d, d) and, if `centered`, `sum_x J_x` (k, H', W', d)."""
  n, out_h, out_w, d = patch_tensor.shape
  dtype = patch_tensor.dtype

  def flat_fn(p):
    return jnp.reshape(fn(p, *args), (-1,))

  jac = jax.jacfwd(flat_fn) if forward else jax.jacrev(flat_fn)

  def chunk_sums(block):
    j = jax.vmap(jac)(block).astype(dtype)  # (b, k, H', W', d)
    jf = j.reshape(-1, d)
    g = jnp.matmul(jf.T, jf, precision=_HIGHEST)
    s = jnp.sum(j, axis=0) if centered else None
    return g, s

  k_shape = jax.eval_shape(flat_fn, patch_tensor[0]).shape
  init = (jnp.zeros((d, d), dtype),
          jnp.zeros(k_shape + (out_h, out_w, d), dtype) if centered else None)

  def add(carry, block):
    g, s = chunk_sums(block)
    return carry[0] + g, (carry[1] + s) if centered else None

  num_full = n // chunk_size

  def body(i, carry):
    block = jax.lax.dynamic_slice_in_dim(patch_tensor, i * chunk_size, chunk_size, axis=0)
    return add(carry, block)

  carry = jax.lax.fori_loop(0, num_full, body, init) if num_full else init
  if num_full * chunk_size < n:
    carry = add(carry, patch_tensor[num_full * chunk_size:])
  return carry


def patch_agop(fn: Callable[..., jax.Array],
               patch_tensor: jax.Array,
               *args: Any,
               chunk_size: Optional[int] = None,
               centered: bool = False,
               power: float = 1.0,
               reduce_positions: str = 'sum') -> jax.Array:
  """Patch AGOP of `fn` by autodiff through an explicit patch tensor (generic form).

  `G = (1/n) sum_x sum_ij sum_o grad_{p_ij} f_o(x) grad_{p_ij} f_o(x)^T`, where every patch
  `p_ij` of example `x` is an independent variable (overlapping patches are separate copies).
  See the module docstring for `centered`, `power` and `reduce_positions`.

  Examples are processed in chunks of `chunk_size` (a `lax.fori_loop` over chunks plus one
  remainder chunk, all in one compiled program); per chunk the per-example Jacobians
  `(chunk_size, k, H', W', d)` are formed by `vmap` of `jax.jacrev` (k reverse passes, chosen
  when `k <= H' W' d`, the usual case) or `jax.jacfwd`, and reduced to `J^T J` (d, d) at once.
  The compiled program is cached on `fn` (by identity), shapes, dtypes and options: pass a fixed
  function and put parameters in `args` instead of creating a new lambda per call.

  Args:
    fn: `fn(patches_one (H', W', d), *args) -> (k,)` outputs for one example (a scalar output
      counts as k = 1), e.g. the logits of a network whose layer input patches are given.
      Must be a pure, differentiable JAX function.
    patch_tensor: `(n, H', W', d)` patches of n examples (e.g. `jconvrfm.patches(x, q)` or of a
      hidden layer's input), real floating dtype (kept in the result), finite, n >= 1.
    *args: further arguments of `fn`, shared by all examples (pytrees of arrays, e.g. params).
    chunk_size: examples per chunk; `None` picks the largest chunk whose Jacobians fit in
      `DEFAULT_CHUNK_BYTES` (64 MiB), at least 1. Larger chunks are faster but use more memory.
    centered: subtract the mean gradient per output and position (gradient covariance).
    power: PSD power applied to the result (1: unchanged; 0.5: square root); a float > 0.
    reduce_positions: `'sum'` over positions or `'mean'` (divide by `H' W'`).

  Returns:
    `(d, d)` symmetric AGOP, dtype of `patch_tensor`.

  Raises:
    TypeError: `fn` not callable, bad option types.
    ValueError: wrong rank, empty or non-finite `patch_tensor`, `fn` returning an array of rank
      > 1, non-finite gradients of `fn` (checked outside transformations), bad option values.

  Example:
    >>> import jax.numpy as jnp
    >>> from jconvrfm import patches, patch_agop
    >>> x = jnp.ones((2, 5, 5, 1))
    >>> w = jnp.ones((9, 4)) / 3
    >>> fn = lambda p, w: jnp.sum(jnp.tanh(p @ w), axis=(0, 1))  # (k,) = (4,)
    >>> patch_agop(fn, patches(x, 3), w).shape
    (9, 9)

  References:
    D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
    convolutional neural networks. arXiv:2309.00570, 2023.
  """
  if not callable(fn):
    raise TypeError(f'`fn` must be callable, got {type(fn).__name__}.')
  patch_tensor = checks.check_array(patch_tensor, 'patch_tensor', 4,
                                    layout="(n, H', W', d)")
  centered, power, reduce_positions = _check_options(centered, power, reduce_positions)
  n, out_h, out_w, d = patch_tensor.shape
  if out_h * out_w * d == 0:
    raise ValueError(f'`patch_tensor` must have non-empty positions and features, got shape '
                     f'{tuple(patch_tensor.shape)}.')
  try:
    out = jax.eval_shape(lambda p: fn(p, *args),
                         jax.ShapeDtypeStruct((out_h, out_w, d), patch_tensor.dtype))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"`fn` failed on one example of shape {(out_h, out_w, d)} (H', W', d) "
                     f'with the given args: {e}') from e
  if not isinstance(out, jax.ShapeDtypeStruct) or out.ndim > 1:
    what = tuple(out.shape) if isinstance(out, jax.ShapeDtypeStruct) else type(out).__name__
    raise ValueError(f'`fn` must return a scalar or a vector (k,) per example, got {what}.')
  if not jnp.issubdtype(out.dtype, jnp.inexact):
    raise ValueError(f'`fn` must return a floating array, got dtype {out.dtype}.')
  k = max(out.size, 1)
  if chunk_size is None:
    per_example = k * out_h * out_w * d * patch_tensor.dtype.itemsize
    chunk_size = max(1, min(n, DEFAULT_CHUNK_BYTES // per_example))
  else:
    chunk_size = min(checks.check_positive_int(chunk_size, 'chunk_size'), n)
  forward = k > out_h * out_w * d
  g_sum, grad_sum = _patch_agop_sums(fn, patch_tensor, tuple(args), chunk_size, centered,
                                     forward)
  if checks.is_concrete(g_sum) and not bool(jnp.all(jnp.isfinite(g_sum))):
    raise ValueError('The gradients of `fn` w.r.t. the patches are not finite (NaN or Inf) for '
                     'some example; fix `fn` (e.g. a norm or square root at zero) rather than '
                     'the AGOP.')
  mean_grads = grad_sum / n if centered else None
  return _finish(g_sum / n, mean_grads, out_h * out_w, power, reduce_positions)


# ----------------------------------------------------------------------------------------------
# Closed form for a conv layer: G = W Sigma W^T.
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=('centered',))
def _conv_agop_core(w: jax.Array, delta: jax.Array,
                    centered: bool) -> Tuple[jax.Array, Optional[jax.Array]]:
  """`W Sigma W^T` (d, d) and, if centered, the mean gradients `W dbar` (outputs*H'*W', d)."""
  n, k = delta.shape[0], delta.shape[-1]
  flat = delta.reshape(-1, k)
  sigma = jnp.matmul(flat.T, flat, precision=_HIGHEST) / n
  g = jnp.matmul(jnp.matmul(w, sigma, precision=_HIGHEST), w.T, precision=_HIGHEST)
  if not centered:
    return g, None
  mean_delta = jnp.mean(delta, axis=0).reshape(-1, k)
  return g, jnp.matmul(mean_delta, w.T, precision=_HIGHEST)


def conv_agop(kernel: jax.Array,
              preact_grads: jax.Array,
              *,
              centered: bool = False,
              power: float = 1.0,
              reduce_positions: str = 'sum') -> jax.Array:
  """Patch AGOP of a conv layer in closed form, `W Sigma W^T`.

  If the layer computes pre-activations `z_ij = W^T p_ij (+ b)` from its input patches `p_ij`
  (any stride and padding; `W = kernel.reshape(d, k)` in Flax kernel order), then
  `grad_{p_ij} f_o = W delta_{o,ij}` with `delta_{o,ij} = d f_o / d z_ij`, so the patch AGOP
  (see `patch_agop`) is `G = W Sigma W^T` with `Sigma = (1/n) sum_x sum_ij sum_o delta delta^T`.
  The options have exactly the meaning they have in `patch_agop`; `centered` uses
  `gbar_{o,ij} = W mean_x delta_{o,ij}`. The result equals `patch_agop` of the same network up
  to float rounding.

  Args:
    kernel: the layer's weights, `(q, q, c, k)` Flax (HWIO) layout (or `(d, k)` filters),
      finite, real floating.
    preact_grads: gradients of the network outputs w.r.t. the layer's pre-activation (before
      bias and nonlinearity), `(n, H', W', k)` for a single output per example, or
      `(n, outputs, H', W', k)` for several outputs per example (all outputs are summed in the
      AGOP); finite, real floating.
    centered: subtract the mean gradient per output and position (gradient covariance).
    power: PSD power applied to the result (1: unchanged; 0.5: square root); a float > 0.
    reduce_positions: `'sum'` over positions or `'mean'` (divide by `H' W'`).

  Returns:
    `(d, d)` symmetric AGOP, dtype `result_type(kernel, preact_grads)`.

  Raises:
    ValueError: wrong ranks, empty or non-finite input, or the last axis of `preact_grads`
      differing from the number of filters k of `kernel`; bad option values.
    TypeError: bad option types.

  Example:
    >>> import jax.numpy as jnp
    >>> from jconvrfm import conv_agop
    >>> kernel = jnp.ones((3, 3, 1, 4)) / 3
    >>> deltas = jnp.ones((2, 10, 5, 5, 4))  # (n, outputs, H', W', k)
    >>> conv_agop(kernel, deltas).shape
    (9, 9)

  References:
    D. Beaglehole, A. Radhakrishnan, P. Pandit, M. Belkin. Mechanism of feature learning in
    convolutional neural networks. arXiv:2309.00570, 2023.
  """
  w = cnfa._check_kernel(kernel)  # pylint: disable=protected-access
  delta = checks.check_array(preact_grads, 'preact_grads', (4, 5),
                             layout="(n, H', W', k) or (n, outputs, H', W', k)")
  centered, power, reduce_positions = _check_options(centered, power, reduce_positions)
  if delta.shape[-1] != w.shape[1]:
    raise ValueError(
        f'The last axis of `preact_grads` (shape {tuple(delta.shape)}) must equal the number of '
        f'filters k = {w.shape[1]} of `kernel` (shape {tuple(jnp.shape(kernel))}).')
  if delta.size == 0:
    raise ValueError(f'`preact_grads` must not be empty, got shape {tuple(delta.shape)}.')
  dtype = jnp.result_type(w, delta)
  g, mean_grads = _conv_agop_core(w.astype(dtype), delta.astype(dtype), centered)
  num_positions = delta.shape[-3] * delta.shape[-2]
  return _finish(g, mean_grads, num_positions, power, reduce_positions)
