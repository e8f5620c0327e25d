"""jconvrfm's experiment binaries (absl apps: `python -m experiments.<name>`)."""

import os

# Wider SIMD for XLA's CPU code: LLVM prefers 256-bit vectors even where the CPU has AVX-512.
# On the 2-core AMD EPYC (Zen 4) container, 512-bit vectors made the fused CNTK's kernel
# matrices about 9% faster and the predictor AGOP about 7% (WORKSPACE.md, 2026-11-27).
_CPU_VECTOR_FLAG = '--xla_cpu_prefer_vector_width=512'


def _cpu_has_avx512() -> bool:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('flags'):
          return 'avx512f' in line.split()
  except OSError:
    pass
  return False


def default_cache_dir() -> str:
  """The binaries' default persistent compilation cache, `$XDG_CACHE_HOME/jconvrfm/jax`."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'jconvrfm', 'jax')


def use_jax_flags():
  """Registers jax's options as absl flags, and tunes XLA's CPU codegen; call before `app.run`.

  Then every binary takes jax's options as flags, e.g. `--jax_platforms`. On a jax without
  this hook nothing is registered, and its options are read from `JAX_*` environment variables.

  Persistent compilation cache, on by default: unless `--jax_compilation_cache_dir` or
  `JAX_COMPILATION_CACHE_DIR` names another folder, compiled programs are kept in
  `$XDG_CACHE_HOME/jconvrfm/jax` (`~/.cache/jconvrfm/jax`), every program however fast it
  compiled (`--jax_persistent_cache_min_compile_time_secs` defaults to 0 here: ConvRFM's
  programs compile in 0.05-2.5 s each on a 2-core CPU, and the small ones add up). Reruns
  with the same shapes, and runs resumed from their workdir, then skip compilation (the
  noisy-MNIST README run: 106 s cold, 91 s warm). `--nojax_enable_compilation_cache` turns it
  off.

  On a CPU with AVX-512 it also adds `--xla_cpu_prefer_vector_width=512` to `XLA_FLAGS`
  (read when jax first starts its backend, so this must run before any computation), unless
  `XLA_FLAGS` already sets a vector width: set `XLA_FLAGS=--xla_cpu_prefer_vector_width=256`
  for XLA's default. Accelerator backends ignore it.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_cpu_prefer_vector_width' not in flags and _cpu_has_avx512():
    os.environ['XLA_FLAGS'] = f'{flags} {_CPU_VECTOR_FLAG}'.strip()
  import jax  # pylint: disable=g-import-not-at-top
  # Defaults only: flags given on the command line override them (`config_with_absl` sets
  # only the flags that are present), and environment variables are left to jax.
  if not os.environ.get('JAX_COMPILATION_CACHE_DIR') and not (
      getattr(jax.config, 'jax_compilation_cache_dir', None)):
    jax.config.update('jax_compilation_cache_dir', default_cache_dir())
  if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  if hasattr(jax.config, 'config_with_absl'):
    jax.config.config_with_absl()
