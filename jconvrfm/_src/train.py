"""A small, explicit optax training loop for the reference CNNs, with checkpoints and metrics.

One canonical loop, read top to bottom: an optimizer and a loss picked by name, a jitted step
(batch-norm statistics updated in train mode, dropout keyed by the step), seeded shuffling that
depends only on `(seed, epoch)` so that a resumed run replays the same batches, evaluation,
JSON-lines metrics, and msgpack checkpoints (params, batch stats, optimizer state, step) in an
explicit `workdir`. A non-finite training loss stops the run with `FloatingPointError`.

Data parallel over `devices` (default: every local accelerator, or the first CPU device, of
every process): each batch is split along a one-axis `Mesh` (`"data"`) and the state is
replicated, so the one jitted step computes the global-batch loss, its gradients (XLA inserts
the all-reduce) and the batch-norm statistics over the whole batch, as on one device.
`evaluate(devices=...)` splits its batches over the same devices.

Multi-host (after `jax.distributed.initialize()`, e.g. the hosts of a TPU pod slice): the
mesh spans the devices of every process. Every process holds the same images, draws the same
permutation and fills only its own devices' slices of each batch
(`jax.make_array_from_callback`), so all of them run the same global steps. The workdir
belongs to process 0: it alone writes checkpoints and metrics, and on a resume it reads the
latest checkpoint and broadcasts it (`processes.broadcast_bytes`), so hosts need no shared
filesystem.

References:
  JAX distributed arrays and automatic parallelization:
  https://docs.jax.dev/en/latest/notebooks/Distributed_arrays_and_automatic_parallelization.html
  JAX multi-process guide: https://docs.jax.dev/en/latest/multi_process.html
"""

import functools
import json
import os
import pathlib
import re
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Union

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jconvrfm._src import checks
from jconvrfm._src import processes

LOSSES = ('mse', 'cross_entropy')
OPTIMIZERS = ('adam', 'sgd')
_CKPT_RE = re.compile(r'^checkpoint_(\d+)\.msgpack$')


class TrainState(NamedTuple):
  """Training state (a pytree).

  Attributes:
    step: () int32, number of optimizer steps taken.
    params: the model's `'params'` collection.
    batch_stats: the `'batch_stats'` collection (`{}` for models without batch norm).
    opt_state: the optax state.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> Dict[str, Any]:
    """`{'params': ..., ['batch_stats': ...]}` for `model.apply`."""
    v = {'params': self.params}
    if self.batch_stats:
      v['batch_stats'] = self.batch_stats
    return v


class TrainResult(NamedTuple):
  """What `train` returns: final state and the per-epoch metric records (also in metrics.jsonl)."""
  state: TrainState
  history: List[Dict[str, Any]]


def make_optimizer(name: str = 'adam', learning_rate: float = 1e-3,
                   momentum: float = 0.9) -> optax.GradientTransformation:
  """`'adam'` (`optax.adam`) or `'sgd'` (`optax.sgd` with `momentum`, 0 for plain SGD)."""
  if name == 'adam':
    return optax.adam(learning_rate)
  if name == 'sgd':
    return optax.sgd(learning_rate, momentum=momentum or None)
  raise ValueError(f'`optimizer` must be one of {OPTIMIZERS}, got {name!r}.')


def loss_value(logits: jax.Array, labels: jax.Array, num_classes: int, loss: str) -> jax.Array:
  """Mean loss over the batch.

  Args:
    logits: `(n, num_classes)`.
    labels: `(n,)` integer class labels.
    num_classes: number of classes.
    loss: `'mse'` (mean over examples and classes of `(logit - onehot)^2`, torch's
      `MSELoss`) or `'cross_entropy'` (softmax cross-entropy, mean over examples).
  """
  return jnp.mean(_per_example_loss(logits, labels, num_classes, loss))


def _per_example_loss(logits: jax.Array, labels: jax.Array, num_classes: int,
                      loss: str) -> jax.Array:
  """`(n,)` losses whose mean is `loss_value` (for MSE, each example's mean over classes)."""
  onehot = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
  if loss == 'mse':
    return jnp.mean((logits - onehot)**2, axis=-1)
  if loss == 'cross_entropy':
    return optax.softmax_cross_entropy(logits, onehot)
  raise ValueError(f'`loss` must be one of {LOSSES}, got {loss!r}.')


def init_state(model: nn.Module, optimizer: optax.GradientTransformation,
               sample_images: jax.Array, seed: int) -> TrainState:
  """Initialises the model with `jax.random.key(seed)` on `sample_images[:1]` `(1, H, W, c)`."""
  variables = model.init(jax.random.key(seed), sample_images[:1], train=False)
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=batch_stats, opt_state=optimizer.init(params))


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, *,
                    num_classes: int, loss: str, seed: int):
  """A jitted `(state, images (b, H, W, c), labels (b,)) -> (state, loss ())` step."""
  if loss not in LOSSES:
    raise ValueError(f'`loss` must be one of {LOSSES}, got {loss!r}.')
  base_key = jax.random.key(seed)

  @jax.jit
  def step(state: TrainState, images, labels):
    rng = jax.random.fold_in(jax.random.fold_in(base_key, 1), state.step)

    def objective(params):
      v = {'params': params}
      if state.batch_stats:
        v['batch_stats'] = state.batch_stats
      logits, updates = model.apply(v, images, train=True, rngs={'dropout': rng},
                                    mutable=['batch_stats'])
      return loss_value(logits, labels, num_classes, loss), updates

    (value, updates), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    upd, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, upd)
    return TrainState(state.step + 1, params, updates.get('batch_stats', state.batch_stats),
                      opt_state), value

  return step


@functools.lru_cache(maxsize=16)
def _eval_sums(model: nn.Module, num_classes: int, loss: str):
  """One jitted `(variables, images, labels, weights) -> (correct, loss sum)` per model and
  loss (Flax modules hash by their fields): weighted sums over the batch, so padded rows
  (weight 0) do not count."""

  @jax.jit
  def sums(variables, x, y, w):
    logits = model.apply(variables, x, train=False)
    per_example = _per_example_loss(logits, y, num_classes, loss)
    hits = (jnp.argmax(logits, -1) == y).astype(w.dtype)
    return jnp.sum(w * hits), jnp.sum(w * per_example.astype(w.dtype))

  return sums


def evaluate(model: nn.Module, variables: Dict[str, Any], images: jax.Array,
             labels: jax.Array, *, num_classes: int, loss: str = 'cross_entropy',
             batch_size: int = 500,
             devices: Optional[Sequence[jax.Device]] = None) -> Dict[str, float]:
  """Accuracy and mean loss of `model` (inference mode) on `images (n, H, W, c)`, `labels (n,)`.

  Batches of `batch_size` images; the loss is `loss_value`'s, averaged over all images.
  With `devices` (as `train`'s, e.g. the devices a trained state is replicated on; several
  processes make this a collective), each batch is split over them, padded to a multiple of
  their number with rows that do not count; without, it runs where jax puts `variables`.
  """
  images = checks.check_nhwc(images, 'images')
  labels = np.asarray(labels)
  if labels.shape != (images.shape[0],):
    raise ValueError(f'`labels` must have shape ({images.shape[0]},), got {labels.shape}.')
  batch_size = checks.check_positive_int(batch_size, 'batch_size')
  sums = _eval_sums(model, num_classes, loss)
  host_images = np.asarray(images)
  n = images.shape[0]
  if devices is None:
    put = lambda x: x
    b = batch_size
  else:
    devices = processes.devices_or_default(devices)
    replicated, put = _data_parallel(devices)
    variables = jax.device_put(variables, replicated)
    b = -(-batch_size // len(devices)) * len(devices)
  correct, total_loss = 0.0, 0.0
  for i in range(0, n, b):
    x, y = host_images[i:i + b], labels[i:i + b].astype(np.int32)
    w = np.ones(x.shape[0], np.float32)
    if devices is not None and x.shape[0] < b:   # pad the last batch; its padding weighs 0
      pad = b - x.shape[0]
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros(pad, y.dtype)])
      w = np.concatenate([w, np.zeros(pad, w.dtype)])
    c, l = sums(variables, put(x), put(y), put(w))
    correct += float(c)
    total_loss += float(l)
  return {'accuracy': correct / n, 'loss': total_loss / n}


# ----------------------------------------------------------------------------------------------
# Checkpoints.
# ----------------------------------------------------------------------------------------------

def checkpoint_dir(workdir: Union[str, os.PathLike]) -> pathlib.Path:
  return pathlib.Path(workdir) / 'checkpoints'


def save_checkpoint(workdir: Union[str, os.PathLike], state: TrainState, keep: int = 2) -> str:
  """Writes `workdir/checkpoints/checkpoint_<step>.msgpack` atomically; keeps the last `keep`."""
  d = checkpoint_dir(workdir)
  d.mkdir(parents=True, exist_ok=True)
  path = d / f'checkpoint_{int(state.step)}.msgpack'
  tmp = path.with_suffix('.tmp')
  tmp.write_bytes(flax.serialization.to_bytes(jax.device_get(state._asdict())))
  os.replace(tmp, path)
  steps = sorted(int(m.group(1)) for m in map(_CKPT_RE.match, os.listdir(d)) if m)
  for s in steps[:-keep]:
    (d / f'checkpoint_{s}.msgpack').unlink(missing_ok=True)
  return str(path)


def latest_checkpoint(workdir: Union[str, os.PathLike]) -> Optional[str]:
  """Path of the checkpoint with the highest step in `workdir`, or None."""
  d = checkpoint_dir(workdir)
  if not d.is_dir():
    return None
  steps = [int(m.group(1)) for m in map(_CKPT_RE.match, os.listdir(d)) if m]
  return str(d / f'checkpoint_{max(steps)}.msgpack') if steps else None


def restore_checkpoint(path: Union[str, os.PathLike], template: TrainState) -> TrainState:
  """Restores a `TrainState` saved by `save_checkpoint` into the structure of `template`."""
  return _state_from_bytes(pathlib.Path(path).read_bytes(), template)


def _state_from_bytes(data: bytes, template: TrainState) -> TrainState:
  return TrainState(**flax.serialization.from_bytes(template._asdict(), data))


def _restore_latest(workdir: Union[str, os.PathLike], template: TrainState,
                    shared: bool) -> Optional[TrainState]:
  """The latest checkpoint in `workdir`, or None; `shared`: process 0's, in every process."""
  def read():
    path = latest_checkpoint(workdir)
    return None if path is None else pathlib.Path(path).read_bytes()

  data = processes.broadcast_bytes(read) if shared else read()
  return None if data is None else _state_from_bytes(data, template)


# ----------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------


def _data_parallel(devices: Sequence[jax.Device]):
  """`(replicated, split)` for a one-axis `"data"` mesh over `devices`: the sharding of a
  replicated state, and a function taking a host batch (the same in every process) to a
  global array split along its first axis (each process fills its own devices' slices)."""
  mesh = Mesh(np.array(devices), ('data',))
  split = NamedSharding(mesh, PartitionSpec('data'))
  return (NamedSharding(mesh, PartitionSpec()),
          lambda x: jax.make_array_from_callback(x.shape, split, lambda index: x[index]))


def data_parallel_devices(devices: Optional[Sequence[jax.Device]] = None,
                          batch_size: Optional[int] = None) -> List[jax.Device]:
  """The devices `train` splits its batches over: `devices` checked, or the default.

  Default: every local device of an accelerator, or the first CPU device, of every process
  (`processes.devices_or_default`). A list of this process's devices trains in this process
  alone; a list that spans processes must hold devices of all of them. Raises `ValueError`
  when `batch_size` is not a multiple of their number.
  """
  devices = processes.devices_or_default(devices)
  if batch_size is not None and batch_size % len(devices):
    raise ValueError(
        f'`batch_size` ({batch_size}) must be a multiple of the number of devices '
        f'({len(devices)}), over which each batch is split.')
  return devices


def train(model: nn.Module,
          images: jax.Array,
          labels: jax.Array,
          *,
          num_classes: int,
          epochs: int,
          batch_size: int,
          optimizer: str = 'adam',
          learning_rate: float = 1e-3,
          momentum: float = 0.9,
          loss: str = 'cross_entropy',
          seed: int = 0,
          eval_images: Optional[jax.Array] = None,
          eval_labels: Optional[jax.Array] = None,
          workdir: Optional[Union[str, os.PathLike]] = None,
          checkpoint_every_steps: Optional[int] = None,
          max_steps: Optional[int] = None,
          progress: bool = True,
          devices: Optional[Sequence[jax.Device]] = None) -> TrainResult:
  """Trains `model` on `(images, labels)`; resumes from the latest checkpoint in `workdir`.

  Every epoch visits `n // batch_size` batches (the remainder is dropped) of a permutation
  drawn from `(seed, epoch)`; parameters are initialised from `seed`. With a `workdir`, a
  checkpoint is written every `checkpoint_every_steps` steps (default: every epoch) and at
  the end, and one JSON record per epoch is appended to `workdir/metrics.jsonl`
  (`step`, `epoch`, `train_loss`, and `eval_accuracy`/`eval_loss` when eval data is given).
  A run resumed from a checkpoint takes exactly the same steps as an uninterrupted one.

  Args:
    model: a Flax module called as `model.apply(v, x, train=...)` returning `(n, num_classes)`.
    images: `(n, H, W, c)` floating images.
    labels: `(n,)` integer labels in `[0, num_classes)`.
    num_classes: number of classes.
    epochs: total number of epochs (including any already done before a resume).
    batch_size: examples per step (<= n).
    optimizer: `'adam'` or `'sgd'` (with `momentum`).
    learning_rate, momentum: optimizer settings.
    loss: `'mse'` (one-hot targets) or `'cross_entropy'`.
    seed: initialisation, shuffling and dropout seed.
    eval_images, eval_labels: optional held-out data evaluated after each epoch.
    workdir: optional directory for checkpoints and metrics.
    checkpoint_every_steps: checkpoint period in steps.
    max_steps: stop after this many total steps (e.g. to bound time); checkpointed.
    progress: show a tqdm bar.
    devices: devices to split each batch over (data parallel; see the module docstring);
      default every local accelerator, or the first CPU device, of every process. Devices of
      several processes make this a collective: every process calls `train` with the same
      arguments (its own `workdir` is ignored but for process 0's); devices of this process
      alone train here, with this process's `workdir`. `batch_size` must be a multiple of
      their number. The returned state is replicated on them
      (`processes.local_replica` gives a process its own copy).

  Returns:
    `TrainResult(state, history)`.

  Raises:
    FloatingPointError: if the training loss becomes NaN or Inf (the step is named).

  >>> import jax, jax.numpy as jnp
  >>> from jconvrfm.models import VanillaCNN
  >>> x = jax.random.normal(jax.random.key(0), (16, 8, 8, 1), jnp.float32)
  >>> y = (x.mean((1, 2, 3)) > 0).astype(jnp.int32)
  >>> r = train(VanillaCNN(2, width=4, depth=1), x, y, num_classes=2, epochs=1, batch_size=8,
  ...           progress=False)
  >>> int(r.state.step)
  2
  """
  images = checks.check_nhwc(images, 'images')
  labels = np.asarray(labels)
  if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'`labels` must be integers of shape ({images.shape[0]},), '
                     f'got {labels.dtype} {labels.shape}.')
  num_classes = checks.check_positive_int(num_classes, 'num_classes', 2)
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f'`labels` must lie in [0, {num_classes}), got range '
                     f'[{labels.min()}, {labels.max()}].')
  epochs = checks.check_positive_int(epochs, 'epochs')
  batch_size = checks.check_positive_int(batch_size, 'batch_size')
  n = images.shape[0]
  if batch_size > n:
    raise ValueError(f'`batch_size` ({batch_size}) must be <= the number of images ({n}).')
  if (eval_images is None) != (eval_labels is None):
    raise ValueError('`eval_images` and `eval_labels` must be given together.')
  steps_per_epoch = n // batch_size
  total_steps = epochs * steps_per_epoch
  if max_steps is not None:
    total_steps = min(total_steps, checks.check_positive_int(max_steps, 'max_steps'))
  every = checkpoint_every_steps or steps_per_epoch
  devices = data_parallel_devices(devices, batch_size)
  # Over several processes: a collective run whose workdir belongs to process 0.
  shared = len({d.process_index for d in devices}) > 1
  owner = not shared or jax.process_index() == 0
  replicated, global_batch = _data_parallel(devices)

  tx = make_optimizer(optimizer, learning_rate, momentum)
  state = init_state(model, tx, images, seed)
  if workdir is not None:
    restored = _restore_latest(workdir, state, shared)
    if restored is not None:
      state = restored
      logging.info('Resumed from %s (step %d).', checkpoint_dir(workdir), int(state.step))
  state = jax.device_put(state, replicated)
  host_images = np.asarray(images)
  step_fn = make_train_step(model, tx, num_classes=num_classes, loss=loss, seed=seed)
  shuffle_key = jax.random.fold_in(jax.random.key(seed), 0)

  history = []
  metrics_file = None
  writes = workdir is not None and owner
  if writes:
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    metrics_file = pathlib.Path(workdir) / 'metrics.jsonl'
  start = int(state.step)
  epoch_losses: List[float] = []
  t0 = time.time()
  bar = tqdm.tqdm(total=total_steps, initial=start, desc='train',
                  disable=not progress or not owner,
                  unit='step')
  perm, perm_epoch = None, -1
  for step in range(start, total_steps):
    epoch, i = divmod(step, steps_per_epoch)
    if epoch != perm_epoch:
      perm = np.asarray(jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), n))
      perm_epoch = epoch
    idx = perm[i * batch_size:(i + 1) * batch_size]
    state, value = step_fn(state, global_batch(host_images[idx]), global_batch(labels[idx]))
    value = float(value)
    if not np.isfinite(value):
      raise FloatingPointError(
          f'training loss is {value} at step {step + 1} (epoch {epoch + 1}); lower the '
          'learning rate or check the inputs.')
    epoch_losses.append(value)
    bar.update(1)
    bar.set_postfix(loss=f'{value:.4g}')
    done = step + 1
    if done % steps_per_epoch == 0:
      record = {'step': done, 'epoch': done // steps_per_epoch,
                'train_loss': float(np.mean(epoch_losses)), 'time_s': time.time() - t0}
      epoch_losses = []
      if eval_images is not None:
        ev = evaluate(model, state.variables, eval_images, eval_labels,
                      num_classes=num_classes, loss=loss, devices=devices)
        record.update(eval_accuracy=ev['accuracy'], eval_loss=ev['loss'])
      logging.info('epoch %d: %s', record['epoch'], record)
      history.append(record)
      if metrics_file is not None:
        with metrics_file.open('a') as f:
          f.write(json.dumps(record) + '\n')
    if writes and (done % every == 0 or done == total_steps):
      save_checkpoint(workdir, state)
  bar.close()
  return TrainResult(state, history)
