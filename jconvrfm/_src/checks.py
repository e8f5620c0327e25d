"""Argument checks shared by every public function.

Each check raises a `ValueError` (or `TypeError`) that names the offending argument and says
what was expected, so that bad input fails at the API edge instead of deep inside XLA.

Value checks (NaN/Inf) need concrete arrays; under `jit`, `vmap` or `grad` the arguments are
tracers and only shape and dtype checks run. Callers that want value checks inside a
transformed function should run them on the concrete inputs before transforming.
"""

import enum
from typing import Optional, Sequence, Type, TypeVar, Union

import jax
import jax.numpy as jnp
import numpy as np

EnumT = TypeVar('EnumT', bound=enum.Enum)


class Padding(enum.Enum):
  """Spatial padding of a q x q patch extraction or convolution.

  VALID: no padding, `H' = floor((H - q) / stride) + 1`.
  SAME: zero padding so that `H' = ceil(H / stride)`; as in `lax.conv_general_dilated`
    (the extra row/column, if any, goes at the end).
  CIRCULAR: periodic (wrap-around) padding with the same output size as SAME.
  """
  VALID = 'VALID'
  SAME = 'SAME'
  CIRCULAR = 'CIRCULAR'


def canonical_enum(value, enum_cls: Type[EnumT], name: str) -> EnumT:
  """Normalises a string (any case) or a member of `enum_cls` to that member.

  Raises a `ValueError` naming `name` and listing the allowed values otherwise.
  """
  if isinstance(value, enum_cls):
    return value
  if isinstance(value, str):
    for member in enum_cls:
      if member.value.lower() == value.lower():
        return member
  raise ValueError(f'`{name}` must be one of {[m.value for m in enum_cls]} '
                   f'(or a `{enum_cls.__name__}`), got {value!r}.')


def canonical_padding(padding: Union[str, Padding], name: str = 'padding') -> Padding:
  """Normalises a padding given as a string (any case) or `Padding` to `Padding`."""
  return canonical_enum(padding, Padding, name)


def is_concrete(x) -> bool:
  """True if `x` holds values (not an abstract tracer under jit/vmap/grad)."""
  return not isinstance(x, jax.core.Tracer)


def is_identity(m: jax.Array) -> bool:
  """Whether the concrete square matrix `m` is exactly the identity."""
  return bool(jnp.all(m == jnp.eye(m.shape[0], dtype=m.dtype)))


def check_positive_int(value, name: str, minimum: int = 1) -> int:
  """Returns `value` as an int, raising if it is not an integer >= `minimum`."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'`{name}` must be an integer >= {minimum}, got {value!r}.')
  if value < minimum:
    raise ValueError(f'`{name}` must be an integer >= {minimum}, got {value}.')
  return int(value)


def check_finite(x, name: str) -> None:
  """Raises if a concrete array holds NaN or Inf (no-op on tracers)."""
  if not is_concrete(x):
    return
  # On the host with numpy: a concrete array closed over by a function being traced by `jit`
  # is still concrete, but jnp operations on it would return tracers.
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    return
  x = np.asarray(x)
  if not np.all(np.isfinite(x)):
    n_bad = int(np.sum(~np.isfinite(x)))
    raise ValueError(f'`{name}` contains {n_bad} NaN or Inf value(s); inputs must be finite.')


def check_array(x,
                name: str,
                ndim: Optional[Union[int, Sequence[int]]] = None,
                *,
                layout: Optional[str] = None,
                finite: bool = True,
                nonempty: bool = True,
                floating: bool = True) -> jax.Array:
  """Validates an array argument and returns it as a `jax.Array`.

  Args:
    x: the argument.
    name: its name as the user spelled it, used in error messages.
    ndim: required rank (or allowed ranks).
    layout: a human-readable layout such as `'NHWC'` or `'(n, H, W, C)'` for messages.
    finite: reject NaN and Inf (concrete arrays only).
    nonempty: reject arrays with a zero-sized leading (batch) axis.
    floating: reject non-floating dtypes (integers are converted to the default float).

  Returns:
    `x` as a jax array (integer/bool input converted to the default float dtype when
    `floating`).
  """
  if x is None:
    raise TypeError(f'`{name}` must be an array, got None.')
  if not hasattr(x, 'shape') or not hasattr(x, 'dtype'):
    try:
      x = np.asarray(x)
    except Exception as e:  # pylint: disable=broad-except
      raise TypeError(f'`{name}` must be an array, got {type(x).__name__}.') from e
  if ndim is not None:
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if x.ndim not in allowed:
      where = f' with layout {layout}' if layout else ''
      want = allowed[0] if len(allowed) == 1 else f'one of {allowed}'
      raise ValueError(
          f'`{name}` must have rank {want}{where}, got shape {tuple(x.shape)}.')
  if nonempty and x.ndim >= 1 and (x.shape[0] == 0 or x.size == 0):
    raise ValueError(f'`{name}` must not be empty, got shape {tuple(x.shape)}.')
  if floating:
    if x.dtype == np.bool_ or jnp.issubdtype(x.dtype, jnp.integer):
      x = jnp.asarray(x, dtype=jnp.result_type(float))
    elif not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f'`{name}` must have a real floating dtype, got {x.dtype}.')
  if finite:
    check_finite(x, name)
  return jnp.asarray(x)


def check_nhwc(x, name: str, **kwargs) -> jax.Array:
  """`check_array` for a batch of images in NHWC layout `(n, height, width, channels)`."""
  return check_array(x, name, 4, layout='NHWC (n, height, width, channels)', **kwargs)


def check_symmetric_psd(m,
                        name: str,
                        size: Optional[int] = None,
                        *,
                        rtol: float = 1e-5) -> jax.Array:
  """Validates a symmetric positive semi-definite matrix (e.g. a patch metric `M`).

  Args:
    m: the matrix.
    name: argument name for messages.
    size: required side length (e.g. the patch dimension `d = q*q*c`).
    rtol: relative tolerance, w.r.t. the largest absolute eigenvalue / entry, for
      asymmetry and negative eigenvalues.
  """
  m = check_array(m, name, 2, layout='(d, d)')
  if m.shape[0] != m.shape[1]:
    raise ValueError(f'`{name}` must be square, got shape {tuple(m.shape)}.')
  if size is not None and m.shape[0] != size:
    raise ValueError(
        f'`{name}` must have shape ({size}, {size}) to match the patch dimension, '
        f'got {tuple(m.shape)}.')
  if not is_concrete(m):
    return m
  m_host = np.asarray(m, dtype=np.float64)  # host-side, also when closed over inside jit
  scale = float(np.max(np.abs(m_host)))
  asym = float(np.max(np.abs(m_host - m_host.T)))
  if asym > rtol * max(scale, 1e-30):
    raise ValueError(
        f'`{name}` must be symmetric; max |M - M^T| = {asym:.3g} (max |M| = {scale:.3g}).')
  eig_min = float(np.linalg.eigvalsh((m_host + m_host.T) / 2)[0])
  if eig_min < -rtol * max(scale, 1e-30) * m.shape[0]:
    raise ValueError(
        f'`{name}` must be positive semi-definite; its smallest eigenvalue is {eig_min:.3g}.')
  return m


def check_devices(devices, name: str = 'devices') -> list:
  """`devices` as a list: non-empty, jax devices only, none repeated; raises otherwise."""
  devices = list(devices)
  if not devices or not all(isinstance(d, jax.Device) for d in devices):
    raise TypeError(f'`{name}` must be a non-empty sequence of jax devices, got {devices!r}.')
  if len(set(devices)) != len(devices):
    raise ValueError(f'`{name}` must not repeat a device.')
  return devices
