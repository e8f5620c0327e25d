r"""One gradient step from zero: the CNFA holds exactly (shared readout) or in the limit.

Derivation (METHOD.md section 1; arXiv:2309.00570). Let a conv layer with filters
`W = kernel.reshape(d, k)` (d = q*q*c, Flax kernel order) feed a smooth `phi` with
`phi(0) = 0`, `phi'(0) != 0`, and a readout summed over positions:

  f(x) = sum_ij a_ij^T phi(W^T p_ij(x)),   L(W) = (1/2n) sum_x (f(x) - y(x))^2.

Gradient: `dL/dW = (1/n) sum_x (f(x) - y(x)) sum_ij p_ij(x) (a_ij * phi'(W^T p_ij(x)))^T`.
At `W_0 = 0`: `f = 0` and `phi'(0 . p) = phi'(0)`, so one step of size eta gives

  W_1 = -eta dL/dW(0) = eta phi'(0) sum_ij v_ij a_ij^T,   v_ij = (1/n) sum_x y(x) p_ij(x).

*Shared readout* (`a_ij = a` for all positions): `W_1 = c v a^T` with `c = eta phi'(0)` and
`v = sum_ij v_ij`, a rank-one matrix. Its CNFM is `W_1 W_1^T = c^2 |a|^2 v v^T`. The patch
gradient at `W_1` is

  grad_{p_ij} f(x) = W_1 (a * phi'(W_1^T p_ij)) = c v [a^T (a * phi'(c a (v^T p_ij)))] = s_ij(x) v,

a multiple of `v` for every example and position, so the patch AGOP
`G = (1/n) sum_x sum_ij s_ij(x)^2 v v^T` is proportional to `v v^T` as well (and so is the
centered AGOP, `(1/n) sum_x sum_ij (s_ij - mean_x s_ij)^2 v v^T`). Hence corr(CNFM, G) = 1
exactly, Pearson and cosine alike, whatever the step size.

*Position-dependent readout* with i.i.d. `a_ij ~ N(0, I_k / k)`: writing `V = [v_ij]` (d x P,
P positions) and `A` the P x P Gram matrix `A_{ij,i'j'} = a_ij^T a_i'j'`,

  CNFM = W_1 W_1^T = c^2 V A V^T,
  G = (1/n) sum_x sum_ij g_ij g_ij^T ~ phi'(0)^2 c^2 V A^2 V^T,
  g_ij = W_1 (a_ij * phi'(W_1^T p_ij)) ~ phi'(0) W_1 a_ij = phi'(0) c V A_{:, ij},

for a small step (`phi'(W_1^T p) = phi'(0) + O(eta)`; for tanh `O(eta^2)`). As the width k
grows, `A -> I` (entries of `A - I` are O(1/sqrt(k)), `|A - I|_op = O(sqrt(P/k))`), so both
matrices tend to `V V^T` (up to scale) and the correlation tends to 1, with a deficit of order
`P/k + eta^2`. (The *centered* AGOP is not a sensible target here: in the same limit the patch
gradients stop depending on x, so their covariance vanishes; the trend uses the paper's
uncentered AGOP and both correlation measures.)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jconvrfm
from tests import tolerances

Q = 3


def softplus0(z):
  """Smooth, phi(0) = 0, phi'(0) = 1/2, not odd (so the exact case is not tanh-specific)."""
  return jax.nn.softplus(z) - jnp.log(2.0)


def network(x, kernel, readout, phi):
  """f(x) for one image x (H, W, c) via lax conv; readout (k,) shared or (H', W', k)."""
  z = jax.lax.conv_general_dilated(
      x[None], kernel, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST)[0]
  return jnp.sum(readout * phi(z))


def network_of_patches(patches_one, kernel, readout, phi):
  """Same f as a function of the explicit patch tensor (H', W', d) of one image."""
  return jnp.sum(readout * phi(patches_one @ kernel.reshape(-1, kernel.shape[-1])))


def one_step(x, y, readout, width, eta, phi):
  """W_1 = W_0 - eta grad L(W_0) with W_0 = 0 and the squared loss."""
  c = x.shape[-1]

  def loss(kernel):
    preds = jax.vmap(lambda xi: network(xi, kernel, readout, phi))(x)
    return 0.5 * jnp.mean((preds - y) ** 2)

  kernel0 = jnp.zeros((Q, Q, c, width), x.dtype)
  return kernel0 - eta * jax.grad(loss)(kernel0)


@functools.lru_cache(maxsize=None)
def agop_fn(phi):
  """One function object per phi, so `patch_agop` compiles once per shape."""
  return lambda p, w, a: network_of_patches(p, w, a, phi)


def cnfm_and_agop(x, kernel, readout, phi, centered_agop=False):
  fn = agop_fn(phi)
  g = jconvrfm.patch_agop(fn, jconvrfm.patches(x, Q), kernel, readout, centered=centered_agop)
  return jconvrfm.cnfm(kernel), g


def data(seed, n, size, channels=1):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, size, size, channels)))
  y = jnp.asarray(rng.choice([-1.0, 1.0], size=n))
  return x, y, rng


@pytest.mark.parametrize('phi, dphi0', [(jnp.tanh, 1.0), (softplus0, 0.5)])
@pytest.mark.parametrize('eta', [0.05, 1.0])
def test_shared_readout_one_step_is_rank_one_and_exactly_aligned(phi, dphi0, eta):
  x, y, rng = data(seed=0, n=12, size=7, channels=2)
  width = 6
  a = jnp.asarray(rng.normal(size=(width,)))
  kernel1 = one_step(x, y, a, width, eta, phi)
  w1 = np.asarray(kernel1).reshape(-1, width)
  # W_1 = eta phi'(0) v a^T with v = (1/n) sum_x y(x) sum_ij p_ij(x).
  v = np.einsum('n,nijd->d', np.asarray(y), np.asarray(jconvrfm.patches(x, Q))) / len(y)
  tolerances.assert_rel_fro(w1, eta * dphi0 * np.outer(v, a), 1e-12, 'W_1 = c v a^T')
  sv = np.linalg.svd(w1, compute_uv=False)
  assert sv[1] <= 1e-12 * sv[0], f'W_1 is not rank one: singular values {sv}'
  for centered_agop in (False, True):
    m, g = cnfm_and_agop(x, kernel1, a, phi, centered_agop=centered_agop)
    for centered in (True, False):
      corr = float(jconvrfm.correlation(m, g, centered=centered))
      assert abs(corr - 1) <= 1e-6, (centered_agop, centered, corr)
    # And G is proportional to v v^T itself.
    assert abs(float(jconvrfm.correlation(g, np.outer(v, v))) - 1) <= 1e-6


def test_position_dependent_readout_tends_to_ansatz():
  """corr(CNFM, AGOP) rises towards 1 as the width grows and the step shrinks."""
  widths_and_steps = ((32, 0.25), (128, 0.12), (512, 0.06), (2048, 0.03))
  seeds = range(6)
  size = 5  # 3 x 3 positions, d = 9: the width quickly exceeds both.
  means = {True: [], False: []}
  for width, eta in widths_and_steps:
    corrs = {True: [], False: []}
    for seed in seeds:
      x, y, rng = data(seed, n=20, size=size)
      a = jnp.asarray(rng.normal(size=(size - Q + 1, size - Q + 1, width)) / np.sqrt(width))
      kernel1 = one_step(x, y, a, width, eta, jnp.tanh)
      m, g = cnfm_and_agop(x, kernel1, a, jnp.tanh)
      for centered in (True, False):
        corrs[centered].append(float(jconvrfm.correlation(m, g, centered=centered)))
    for centered in (True, False):
      means[centered].append(np.mean(corrs[centered]))
  for centered, curve in means.items():
    assert all(b > a for a, b in zip(curve, curve[1:])), (centered, curve)
    assert curve[0] < 0.99, f'trend starts too close to 1 to be informative: {curve}'
    assert curve[-1] > 0.99, (centered, curve)
