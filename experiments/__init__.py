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


def use_jax_flags():
  """Registers jax's options as absl flags, and tunes XLA's CPU codegen; call before `app.run`.

  Then every binary takes e.g. `--jax_compilation_cache_dir` (a persistent compilation cache:
  reruns and resumed runs skip most compilation) or `--jax_platforms`. On a jax without this
  hook nothing is registered, and its options are read from `JAX_*` environment variables.

  On a CPU with AVX-512 it also adds `--xla_cpu_prefer_vector_width=512` to `XLA_FLAGS`
  (read when jax first starts its backend, so this must run before any computation), unless
  `XLA_FLAGS` already sets a vector width: set `XLA_FLAGS=--xla_cpu_prefer_vector_width=256`
  for XLA's default. Accelerator backends ignore it.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_cpu_prefer_vector_width' not in flags and _cpu_has_avx512():
    os.environ['XLA_FLAGS'] = f'{flags} {_CPU_VECTOR_FLAG}'.strip()
  import jax  # pylint: disable=g-import-not-at-top
  if hasattr(jax.config, 'config_with_absl'):
    jax.config.config_with_absl()
