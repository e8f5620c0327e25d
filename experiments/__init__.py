"""jconvrfm's experiment binaries (absl apps: `python -m experiments.<name>`)."""


def use_jax_flags():
  """Registers jax's options as absl flags; call before `app.run`.

  Then every binary takes e.g. `--jax_compilation_cache_dir` (a persistent compilation cache:
  reruns and resumed runs skip most compilation) or `--jax_platforms`. On a jax without this
  hook nothing is registered, and its options are read from `JAX_*` environment variables.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if hasattr(jax.config, 'config_with_absl'):
    jax.config.config_with_absl()
