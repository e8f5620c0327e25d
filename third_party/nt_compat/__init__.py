"""Compatibility layer that lets neural-tangents 0.6.5 run on current jax.

neural-tangents 0.6.5 (the last release) imports names that jax has since moved
(`jax.core.Jaxpr` and friends now live in `jax.extend.core`), the removed module
`jax.util`, the removed primitive `jax.interpreters.ad.zeros_like_p`, and, for the
structured-derivatives empirical NTK, the old signature of `ad.linearize`,
`Primitive.map_primitive`, `jax.core.DShapedArray`, `ad.source_info_util`,
`ad.reducing_transposes`, `ad.config` and a list-valued `cost_analysis()`; there it also
calls `lu.wrap_init` without the `DebugInfo` that current jax asks for (deprecated), and
`jnp.dtype` / `jnp.size` on arrays and shape structs in ways jax deprecates. Its
`experimental` sub-package also imports TensorFlow and tf2jax eagerly.

`apply()` probes the running jax (with `hasattr` and import attempts, never by version
number) and fills in only what is missing, then returns the names it patched. It is
idempotent: a second call patches nothing and returns an empty list; `patched()` returns
everything patched so far in this process. It also pre-registers a stub for
`neural_tangents.experimental` (unless that module is already imported) so that
`import neural_tangents` never imports TensorFlow; touching the stub's attributes raises
an `ImportError` that explains why.

Typical use:

  >>> from third_party import nt_compat
  >>> _ = nt_compat.apply()
  >>> import neural_tangents as nt
  >>> nt.stax.Relu is not None
  True

References:
  R. Novak et al. Neural Tangents: Fast and Easy Infinite Neural Networks in Python.
  ICLR 2020. https://github.com/google/neural-tangents
"""

import functools
import importlib
import sys
import threading
import types
from typing import Any, Callable, Dict, List

__all__ = ['apply', 'patched', 'ExperimentalUnavailableError', 'ORIGINALS']

_LOCK = threading.Lock()
_PATCHED: List[str] = []
# neural-tangents' own functions that `apply()` replaced, by dotted name (for comparisons).
ORIGINALS: Dict[str, Callable[..., Any]] = {}

# Names neural-tangents reads from `jax.core` that newer jax moved to `jax.extend.core`.
_CORE_NAMES = ('Jaxpr', 'JaxprEqn', 'Literal', 'Var', 'Primitive', 'ShapedArray',
               'AbstractValue', 'Value', 'eval_context')


class ExperimentalUnavailableError(ImportError):
  """Raised on access to a public attribute of the stubbed `neural_tangents.experimental`.

  Dunder lookups (`__file__`, `__spec__`, ...) raise a plain `AttributeError` so that
  tools which inspect every module in `sys.modules` keep working.
  """


def _safe_map(f: Callable[..., Any], *args) -> List[Any]:
  """`map` that insists all arguments have the same length (as `jax.util.safe_map`)."""
  args = [list(a) for a in args]
  n = len(args[0])
  for a in args[1:]:
    if len(a) != n:
      raise ValueError(f'safe_map: length mismatch {[len(a) for a in args]}')
  return [f(*xs) for xs in zip(*args)]


def _safe_zip(*args) -> List[tuple]:
  """`zip` that insists all arguments have the same length (as `jax.util.safe_zip`)."""
  args = [list(a) for a in args]
  n = len(args[0])
  for a in args[1:]:
    if len(a) != n:
      raise ValueError(f'safe_zip: length mismatch {[len(a) for a in args]}')
  return list(zip(*args))


class _DShapedArrayPlaceholder:
  """Stands in for the removed `jax.core.DShapedArray`; never instantiated.

  neural-tangents only tests `type(aval) is core.DShapedArray`, which is then False.
  """


class _UnknownPartialVal:
  """Minimal stand-in for the old `PartialVal` of a non-constant linearized output."""

  def is_known(self) -> bool:
    return False


def _old_style_linearize_works(ad) -> bool:
  """True if `ad.linearize(wrapped_fun, *primals)` has the old 4-tuple behaviour."""
  import warnings  # pylint: disable=g-import-not-at-top
  try:
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from jax.extend import linear_util as lu  # pylint: disable=g-import-not-at-top
    with warnings.catch_warnings():
      # This probe's own `wrap_init` without a DebugInfo (deprecated) is not the user's concern.
      warnings.simplefilter('ignore', DeprecationWarning)
      fn = lu.wrap_init(lambda x: [x * 2.0])
      out = ad.linearize(fn, jnp.float32(1.0), has_aux=False)
    return (len(out) == 4 and len(out[1]) == 1 and hasattr(out[1][0], 'is_known'))
  except Exception:  # pylint: disable=broad-except
    return False


def _make_old_style_linearize(original: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps `ad.linearize` so that the old `(wrapped_fun, *primals)` form works.

  The old form returned `(primals_out, tangent_pvals, linear_jaxpr, consts)`. It is
  rebuilt from public API: `jax.linearize` followed by `jax.make_jaxpr` of the linear
  map (under `disable_jit`, so the jaxpr holds primitive equations, not a `jit` call).
  Calls in the new form are passed through unchanged.
  """
  import jax  # pylint: disable=g-import-not-at-top

  def linearize(traceable, *primals, has_aux=False, **kwargs):
    new_form = (len(primals) == 1 and hasattr(primals[0], 'unflatten') and
                hasattr(primals[0], 'vals'))
    if new_form or kwargs:
      return original(traceable, *primals, has_aux=has_aux, **kwargs)
    if has_aux:
      raise NotImplementedError('nt_compat: old-style ad.linearize with has_aux=True.')
    call = traceable.call_wrapped if hasattr(traceable, 'call_wrapped') else traceable
    with jax.disable_jit():
      out, f_jvp = jax.linearize(lambda *p: tuple(call(*p)), *primals)
      closed = jax.make_jaxpr(f_jvp)(*primals)
    pvals = [_UnknownPartialVal() for _ in out]
    return list(out), pvals, closed.jaxpr, list(closed.consts)

  linearize.__wrapped__ = original
  linearize.__doc__ = _make_old_style_linearize.__doc__
  return linearize


def _stub_experimental() -> types.ModuleType:
  """A module object for `neural_tangents.experimental` that does not import TF."""

  class _Stub(types.ModuleType):

    def __getattr__(self, name):
      if name.startswith('__') and name.endswith('__'):
        raise AttributeError(name)
      raise ExperimentalUnavailableError(
          f'neural_tangents.experimental.{name} is unavailable: third_party.nt_compat '
          'replaced `neural_tangents.experimental` by a stub so that importing '
          'neural-tangents does not import TensorFlow and tf2jax (which its experimental '
          'TF interop needs and which do not work with this jax).')

  stub = _Stub('neural_tangents.experimental',
               'Stub installed by third_party.nt_compat (TensorFlow interop disabled).')
  stub.__file__ = None
  stub.__path__ = []
  return stub


def _patch_jax(record: Callable[[str], None]) -> None:
  """Fills in missing jax names used by neural-tangents."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.core  # pylint: disable=g-import-not-at-top
  from jax.interpreters import ad  # pylint: disable=g-import-not-at-top

  sources = []
  for mod in ('jax.extend.core', 'jax._src.core'):
    try:
      sources.append(importlib.import_module(mod))
    except ImportError:
      pass

  for name in _CORE_NAMES:
    if hasattr(jax.core, name):
      continue
    for src in sources:
      if hasattr(src, name):
        setattr(jax.core, name, getattr(src, name))
        record(f'jax.core.{name}')
        break

  if not hasattr(jax.core, 'DShapedArray'):
    jax.core.DShapedArray = _DShapedArrayPlaceholder
    record('jax.core.DShapedArray')

  primitive_cls = getattr(jax.core, 'Primitive', None)
  if primitive_cls is not None and not hasattr(primitive_cls, 'map_primitive'):
    primitive_cls.map_primitive = False
    record('jax.core.Primitive.map_primitive')

  try:
    import jax.util  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    util = types.ModuleType('jax.util', 'Stand-in for the removed jax.util (nt_compat).')
    util.safe_map = _safe_map
    util.safe_zip = _safe_zip
    sys.modules['jax.util'] = util
    jax.util = util
    record('jax.util')
  else:
    for name, fn in (('safe_map', _safe_map), ('safe_zip', _safe_zip)):
      if not hasattr(jax.util, name):
        setattr(jax.util, name, fn)
        record(f'jax.util.{name}')

  if not hasattr(ad, 'zeros_like_p') and primitive_cls is not None:
    # The primitive no longer exists, so no jaxpr contains it; neural-tangents only uses
    # it as a dictionary key for its Jacobian rules.
    ad.zeros_like_p = primitive_cls('zeros_like')
    record('jax.interpreters.ad.zeros_like_p')

  if not hasattr(ad, 'source_info_util'):
    try:
      from jax.extend import source_info_util  # pylint: disable=g-import-not-at-top
    except ImportError:
      source_info_util = importlib.import_module('jax._src.source_info_util')
    ad.source_info_util = source_info_util
    record('jax.interpreters.ad.source_info_util')

  if not hasattr(ad, 'reducing_transposes'):
    ad.reducing_transposes = {}
    record('jax.interpreters.ad.reducing_transposes')

  if not hasattr(ad, 'config'):
    ad.config = jax.config
    record('jax.interpreters.ad.config')

  if hasattr(ad, 'linearize') and not _old_style_linearize_works(ad):
    ad.linearize = _make_old_style_linearize(ad.linearize)
    record('jax.interpreters.ad.linearize')


def _cost_analysis_is_dict() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  analysis = jax.jit(lambda x: x + 1).lower(jnp.float32(0)).compile().cost_analysis()
  return isinstance(analysis, dict)


def _patch_neural_tangents(record: Callable[[str], None]) -> None:
  """Patches neural-tangents itself where it assumes old jax return types."""
  if 'neural_tangents.experimental' not in sys.modules:
    sys.modules['neural_tangents.experimental'] = _stub_experimental()
    record('neural_tangents.experimental')
  try:
    empirical = importlib.import_module('neural_tangents._src.empirical')
  except ImportError:
    return  # neural-tangents is not installed: nothing else to patch.
  get_flops = getattr(empirical, '_get_flops', None)
  if (get_flops is not None and not getattr(get_flops, '_nt_compat', False) and
      _cost_analysis_is_dict()):
    import jax  # pylint: disable=g-import-not-at-top

    def _get_flops_compat(f, optimize, *a, **kw):
      lowered = jax.jit(f).lower(*a, **kw)
      analysis = lowered.compile().cost_analysis() if optimize else lowered.cost_analysis()
      if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
      return analysis['flops']

    _get_flops_compat._nt_compat = True
    empirical._get_flops = _get_flops_compat
    record('neural_tangents._src.empirical._get_flops')

  lu = getattr(empirical, 'lu', None)
  if lu is not None and not _is_compat(lu) and _wrap_init_takes_debug_info(lu):
    empirical.lu = _LinearUtilWithDebugInfo(lu)
    record('neural_tangents._src.empirical.lu')

  if (not _is_compat(empirical._get_fx_axis_and_dtype) and  # pylint: disable=protected-access
      not _probe_ok(_dtype_of_array)):
    ORIGINALS['neural_tangents._src.empirical._get_fx_axis_and_dtype'] = (
        empirical._get_fx_axis_and_dtype)  # pylint: disable=protected-access
    empirical._get_fx_axis_and_dtype = _get_fx_axis_and_dtype_compat  # pylint: disable=protected-access
    record('neural_tangents._src.empirical._get_fx_axis_and_dtype')
  if (not _is_compat(empirical._std_basis) and  # pylint: disable=protected-access
      not _probe_ok(_size_of_shape_struct)):
    for name in ('_unravel_array_into_pytree', '_std_basis'):
      ORIGINALS['neural_tangents._src.empirical.' + name] = getattr(empirical, name)
    empirical._unravel_array_into_pytree = _unravel_array_into_pytree_compat  # pylint: disable=protected-access
    empirical._std_basis = _std_basis_compat  # pylint: disable=protected-access
    record('neural_tangents._src.empirical._unravel_array_into_pytree')
    record('neural_tangents._src.empirical._std_basis')


def _wrap_init_takes_debug_info(lu) -> bool:
  """True where `lu.wrap_init` has a `debug_info` argument (deprecated to omit, since 0.5)."""
  import inspect  # pylint: disable=g-import-not-at-top
  try:
    from jax.extend.core import DebugInfo  # pylint: disable=g-import-not-at-top,unused-import
    return 'debug_info' in inspect.signature(lu.wrap_init).parameters
  except (ImportError, TypeError, ValueError):
    return False


class _LinearUtilWithDebugInfo(types.ModuleType):
  """`jax.extend.linear_util` for neural-tangents, whose `wrap_init` always gets a DebugInfo.

  neural-tangents' empirical NTK (`_get_fwd_and_pullback`) calls `lu.wrap_init(fn)`, which
  current jax deprecates (a `DeprecationWarning` per call) and a later jax may reject. This
  proxy passes `DebugInfo('neural_tangents', <function name>, None, None)`: the same content
  as jax's own placeholder for a missing one, without the warning. Every other attribute is
  the real module's.
  """
  _nt_compat = True

  def __init__(self, lu):
    super().__init__(lu.__name__, lu.__doc__)
    self._lu = lu

  def __getattr__(self, name):
    return getattr(self._lu, name)

  def wrap_init(self, f, params=None, *, debug_info=None):
    if debug_info is None:
      from jax.extend.core import DebugInfo  # pylint: disable=g-import-not-at-top
      name = getattr(f, '__qualname__', None) or getattr(f, '__name__', None) or repr(f)
      debug_info = DebugInfo('neural_tangents', name, None, None)
    return self._lu.wrap_init(f, params, debug_info=debug_info)


def _is_compat(fn) -> bool:
  return bool(getattr(fn, '_nt_compat', False))


# Probes and replacements for calls that current jax deprecates (with a warning) and a later
# jax rejects: `jnp.dtype(array)`, `jnp.size(ShapeDtypeStruct)` and
# `result_type(ShapeDtypeStruct)`. They are installed where the probe raises or warns, so
# current jax already runs (and the tests exercise) the code a later jax needs.


def _probe_ok(fn: Callable[[], Any]) -> bool:
  """True if `fn()` runs without an exception and without a DeprecationWarning."""
  import warnings  # pylint: disable=g-import-not-at-top
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('error', DeprecationWarning)
      fn()
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def _dtype_of_array():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.dtype(jnp.zeros((1,), jnp.float32))


def _size_of_shape_struct():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  s = jax.ShapeDtypeStruct((2, 3), jnp.float32)
  return jnp.size(s), jax.dtypes.result_type(s, s)


def _get_fx_axis_and_dtype_compat(fx, fx_axis, params):
  """As neural-tangents' helper: default fx_axis, and the promoted dtype of `params`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if fx_axis is None:
    fx_axis = jax.tree_util.tree_map(lambda x: None, fx)
  dtypes = [jnp.dtype(x.dtype) for x in jax.tree_util.tree_leaves(params)]
  dtype = functools.reduce(jnp.promote_types, dtypes) if dtypes else None
  return fx_axis, dtype


_get_fx_axis_and_dtype_compat._nt_compat = True


def _std_basis_compat(pytree):
  """As neural-tangents' `_std_basis`, reading sizes and dtypes from `.shape`/`.dtype`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_leaves(pytree)
  ndim = sum(int(np.prod(l.shape)) for l in leaves)
  dtype = functools.reduce(jnp.promote_types, [jnp.dtype(l.dtype) for l in leaves])
  flat_basis = jnp.eye(ndim, dtype=dtype)
  return _unravel_array_into_pytree_compat(pytree, 1, flat_basis)


def _unravel_array_into_pytree_compat(pytree, axis, arr):
  """As neural-tangents' helper: split `arr` along `axis` into `pytree`'s leaf shapes.

  Sizes and shapes come from each leaf's `.shape` (arrays and `ShapeDtypeStruct`s alike),
  where neural-tangents calls `jnp.size` / `jnp.shape` on them.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  leaves, treedef = jax.tree_util.tree_flatten(pytree)
  if arr.ndim > 0:
    axis %= arr.ndim
  shapes = [tuple(np.shape(l)) for l in leaves]  # `np.shape` reads `.shape` where there is one
  sizes = [int(np.prod(shape)) for shape in shapes]
  parts = jnp.split(arr, np.cumsum(sizes[:-1]).tolist(), axis)
  return jax.tree_util.tree_unflatten(treedef, [
      jnp.reshape(part, arr.shape[:axis] + shape + arr.shape[axis + 1:])
      for part, shape in zip(parts, shapes)])


_unravel_array_into_pytree_compat._nt_compat = True
_std_basis_compat._nt_compat = True


def apply() -> List[str]:
  """Patches jax and neural-tangents where needed; returns the names patched now.

  Idempotent and thread-safe: the second and later calls return `[]`. Each entry is a
  dotted name such as `'jax.core.Jaxpr'` or `'jax.util'`; only names that were missing
  (or, for `ad.linearize` and `_get_flops`, whose behaviour probes showed the old form to
  be missing) are patched. neural-tangents is imported at the end if it is installed.

  Returns:
    List of dotted names patched by this call.
  """
  with _LOCK:
    now: List[str] = []
    record = now.append
    _patch_jax(record)
    _patch_neural_tangents(record)
    _PATCHED.extend(now)
    return now


def patched() -> List[str]:
  """All names patched so far in this process (a copy)."""
  return list(_PATCHED)

