"""The training loop: a stack of models trained together in one compiled step.

`fit(config, workdir, task)` trains any `TrainingTask`: a flax model, an
objective and per-model training arrays [models, n, ...]. The sequence and
image settings differ only in the task. `train(config, workdir)` builds the
hierarchical task from the config and calls `fit`.

Conventions of the records: in metrics.jsonl, "step" is the 0-based index of
the optimizer update (the step folded into its keys) and "epoch" the 0-based
epoch it belongs to. A checkpoint's "step" and "epoch" count the updates and
epochs completed when it was written.

Resume policy: on start, the newest complete checkpoint in the workdir
(rolling or grid) is restored and training continues from its step. Data
order, diffusion noise and dropout are pure functions of (seed, epoch, step),
so the resumed run equals an uninterrupted one; metric lines past the
restored step are dropped and rewritten.
"""

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from biasdiff import parallel
from biasdiff.training import checkpoints
from biasdiff.training import lr_schedules
from biasdiff.training import state as state_lib
from biasdiff.training import step as step_lib
from biasdiff.training.batches import BatchSource

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
EVAL_METRICS_FILE = "eval_metrics.jsonl"
# An eval callback whose record maps this key to True ends training after the
# grid checkpoint it measured. The record stays in eval_metrics.jsonl, so a
# restart from that checkpoint does not train further.
STOP_TRAINING_KEY = "stop_training"


@dataclasses.dataclass(frozen=True)
class TrainingTask:
  """Everything `fit` needs besides the config.

  Attributes:
    model: flax.linen module called as model.apply({"params": p}, x_t, t,
      train=bool, rngs={"dropout": key}).
    objective: callable (denoise, x0, valid, sample_keys) -> (loss, metrics),
      see `biasdiff.training.objectives`.
    train_data: [models, n, ...] training rows of each model, in model order.
    models: the model list, one `ModelSpec` per row of train_data.
    fingerprint: JSON record that identifies the data (block ids, n, hashes).
    example_input: (x_t, t) with a batch of one, used to trace the network at
      initialisation.
  """

  model: Any
  objective: Callable
  train_data: np.ndarray
  models: Sequence[state_lib.ModelSpec]
  fingerprint: Mapping[str, Any]
  example_input: tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class GridPoint:
  """The argument of an evaluation callback at a grid checkpoint.

  The state's buffers are donated to the next train step, so a callback must
  finish with them (or copy them) before returning.
  """

  epoch: int  # epochs completed
  step: int  # optimizer updates completed
  state: state_lib.TrainState
  models: Sequence[state_lib.ModelSpec]
  mesh: Any


# eval_callback(point) -> JSON-serialisable mapping to log, or None. A
# mapping with STOP_TRAINING_KEY set to True ends training.
EvalCallback = Callable[[GridPoint], Optional[Mapping[str, Any]]]


@dataclasses.dataclass
class TrainResult:
  """The outcome of `fit`."""

  state: state_lib.TrainState  # final stacked state
  models: list  # the model list
  step: int  # optimizer updates completed
  grid_epochs: list  # planned grid checkpoint epochs
  steps_per_epoch: int
  stopped_early: bool = False  # an eval callback ended training before num_epochs


def train(config, workdir: str,
          eval_callback: Optional[EvalCallback] = None) -> TrainResult:
  """Train the hierarchical model zoo of `config` into `workdir`.

  With config.monitor.enabled, the bias monitor of `biasdiff.monitor` runs at
  every grid checkpoint next to `eval_callback`.
  """
  # Imported here so the generic engine does not depend on the tree data.
  from biasdiff.training import tasks
  from biasdiff import monitor
  task = tasks.hierarchical_task(config, workdir)
  watcher = monitor.monitor_from_config(config, workdir)
  if watcher is not None:
    eval_callback = monitor.combine_callbacks(eval_callback, watcher)
  return fit(config, workdir, task, eval_callback=eval_callback)


def fit(config, workdir: str, task: TrainingTask, *,
        eval_callback: Optional[EvalCallback] = None,
        stop_at_step: Optional[int] = None,
        compiler_options: Optional[Mapping[str, Any]] = None) -> TrainResult:
  """Train every model of `task` for config.train.num_epochs epochs.

  Args:
    config: a config with sections `train`, `checkpoint` and `parallel` (see
      configs/__init__.py); the whole config is stored with the run.
    workdir: run directory; an existing run there is resumed.
    task: model, objective, data and model list.
    eval_callback: called on every process after each grid checkpoint.
    stop_at_step: stop once this many updates are done, as a preemption
      would, without writing a checkpoint there.
    compiler_options: XLA options of the compiled init and step, e.g.
      {"xla_backend_optimization_level": 0} for fast compiles on CPU.
  """
  run = _Run(config, workdir, task, stop_at_step, compiler_options)
  try:
    run.loop(eval_callback)
  finally:
    run.close()
  return TrainResult(state=run.state, models=list(task.models), step=run.step,
                     grid_epochs=run.grid_epochs,
                     steps_per_epoch=run.source.steps_per_epoch,
                     stopped_early=run.step < run.total_steps and run.stopped_early)


def require_field(valid: bool, field: str, value: Any, requirement: str) -> None:
  """Raise a ValueError naming config `field` and its `value` unless `valid`."""
  if not valid:
    raise ValueError(f"Invalid {field}={value!r}. Set {field} to {requirement}.")


def check_config(config) -> None:
  """Check the train, checkpoint and parallel sections against their ranges.

  The ranges are those documented in configs/__init__.py. `fit` calls this
  before it writes to the workdir; a task builder may call it earlier, before
  it builds or stores data.

  Raises:
    ValueError: naming the first field out of range, its value and the range.
  """
  train_config = config.train
  require_field(train_config.batch_size >= 1, "train.batch_size",
                train_config.batch_size, "a value >= 1")
  require_field(train_config.num_epochs >= 1, "train.num_epochs",
                train_config.num_epochs, "a value >= 1")
  lr_schedules.check_schedule_config(train_config)
  for name in ("adam_b1", "adam_b2"):
    value = train_config[name]
    require_field(0.0 <= value < 1.0, f"train.{name}", value, "a value in [0, 1)")
  require_field(train_config.adam_eps > 0.0, "train.adam_eps", train_config.adam_eps,
                "a value > 0")
  require_field(0.0 <= train_config.ema_decay < 1.0, "train.ema_decay",
                train_config.ema_decay, "a value in [0, 1), or 0 to disable the EMA")
  require_field(train_config.steps_per_dispatch >= 1, "train.steps_per_dispatch",
                train_config.steps_per_dispatch, "a value >= 1")
  require_field(train_config.log_every_steps >= 1, "train.log_every_steps",
                train_config.log_every_steps, "a value >= 1")

  checkpoint_config = config.checkpoint
  num_epochs = int(train_config.num_epochs)
  require_field(checkpoint_config.grid in checkpoints.GRID_KINDS, "checkpoint.grid",
                checkpoint_config.grid, f"one of {checkpoints.GRID_KINDS}")
  if checkpoint_config.grid != "none":
    # The linear grid ends at num_epochs - 1 and then adds num_epochs.
    last = num_epochs if checkpoint_config.grid == "log" else num_epochs - 1
    require_field(1 <= checkpoint_config.grid_min_epoch <= last,
                  "checkpoint.grid_min_epoch", checkpoint_config.grid_min_epoch,
                  f"a value in [1, {last}] for train.num_epochs={num_epochs}")
  require_field(checkpoint_config.grid_size >= 2, "checkpoint.grid_size",
                checkpoint_config.grid_size, "a value >= 2")
  require_field(checkpoint_config.rolling_every_steps >= 0,
                "checkpoint.rolling_every_steps",
                checkpoint_config.rolling_every_steps, "a value >= 0 (0 disables)")
  require_field(checkpoint_config.rolling_every_minutes >= 0.0,
                "checkpoint.rolling_every_minutes",
                checkpoint_config.rolling_every_minutes, "a value >= 0 (0 disables)")
  require_field(checkpoint_config.rolling_to_keep >= 1, "checkpoint.rolling_to_keep",
                checkpoint_config.rolling_to_keep, "a value >= 1")

  require_field(config.parallel.model_axis_size >= 0, "parallel.model_axis_size",
                config.parallel.model_axis_size,
                "a value >= 0 (0 picks gcd(models, devices))")


def _check_mesh_fit(train_config, num_models: int, data_axis: int) -> None:
  """Check the settings that depend on the task and the mesh."""
  if num_models < 1:
    raise ValueError("The task has no models.")
  if train_config.batch_size % data_axis:
    raise ValueError(
        f"train.batch_size={train_config.batch_size} must be divisible by the "
        f"data axis of the mesh ({data_axis} devices); change the batch size "
        "or set parallel.model_axis_size.")


def run_info(config, task: TrainingTask, steps_per_epoch: int,
             grid_epochs: Sequence[int]) -> dict:
  """Return the JSON record that identifies a run (stored as run.json)."""
  return {
      "config": json.loads(config.to_json()),
      "models": [m.to_json() for m in task.models],
      "fingerprint": json.loads(json.dumps(dict(task.fingerprint))),
      "data_shape": list(np.shape(task.train_data)),
      "steps_per_epoch": steps_per_epoch,
      "grid_epochs": list(grid_epochs),
  }


class _MetricsLog:
  """metrics.jsonl writer (process 0 only) and the non-finite check."""

  def __init__(self, path: str, write: bool, first_step: int,
               log_every: int, models: Sequence[state_lib.ModelSpec],
               steps_per_epoch: int):
    self.path = path
    self.write = write
    self.log_every = int(log_every)
    self.models = models
    self.steps_per_epoch = steps_per_epoch
    if write:
      _truncate_jsonl(path, lambda record: record["step"] < first_step)

  def add(self, first_step: int, metrics: Mapping[str, np.ndarray],
          lrs: np.ndarray) -> None:
    """Check and record the [K, M] metrics of steps first_step ... + K - 1."""
    self._check_finite(first_step, metrics)
    if not self.write:
      return
    lines = []
    num_steps = len(lrs)
    for k in range(num_steps):
      step = first_step + k
      if (step + 1) % self.log_every and k != num_steps - 1:
        continue
      record = {"step": step, "epoch": step // self.steps_per_epoch,
                "lr": float(lrs[k])}
      for name, values in metrics.items():
        record[name] = [float(v) for v in values[k]]
      lines.append(json.dumps(record))
    if lines:
      with open(self.path, "a") as f:
        f.write("\n".join(lines) + "\n")

  def _check_finite(self, first_step: int, metrics) -> None:
    for name in ("loss", "grad_norm"):
      bad = np.argwhere(~np.isfinite(metrics[name]))
      if bad.size:
        k, m = (int(i) for i in bad[0])
        step = first_step + k
        raise FloatingPointError(
            f"Non-finite {name} ({metrics[name][k, m]}) at step {step} (epoch "
            f"{step // self.steps_per_epoch}) for model {m} "
            f"({self.models[m].describe()}); lower the learning rate or check "
            "the data of that model.")


def _stop_requested_at(path: str, step: int) -> bool:
  """Return whether the eval record of `step` in `path` asked to stop training."""
  if not os.path.exists(path):
    return False
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return any(r["step"] == step and r.get(STOP_TRAINING_KEY) for r in records)


def _truncate_jsonl(path: str, keep: Callable[[dict], bool]) -> None:
  """Drop the lines of the JSON-lines file `path` for which `keep` is False."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    kept = [line for line in f if line.strip() and keep(json.loads(line))]
  with open(path, "w") as f:
    f.writelines(kept)


@dataclasses.dataclass(frozen=True)
class _Program:
  """The compiled functions of one (model, objective, optimizer, mesh)."""

  abstract: state_lib.TrainState  # shapes, dtypes and shardings of the state
  init: Callable  # init_seeds [M] -> TrainState
  step: Callable  # (state, seeds, x0, valid, lr) -> (state, metrics)


@functools.lru_cache(maxsize=8)
def _program(model, objective, adam: tuple[float, float, float],
             ema_decay: float, example_input_key: tuple, num_models: int,
             mesh, compiler_options: tuple) -> _Program:
  """Build the compiled init and step; cached so repeated fits reuse them."""
  (x_shape, x_dtype), (t_shape, t_dtype) = example_input_key
  x_example = np.zeros(x_shape, x_dtype)
  t_example = np.ones(t_shape, t_dtype)
  options = dict(compiler_options) or None
  optimizer = state_lib.make_optimizer(*adam)
  init_params = lambda key: model.init(key, x_example, t_example,
                                       train=False)["params"]
  init = state_lib.make_init_fn(init_params, optimizer, ema_decay > 0.0)
  abstract = state_lib.abstract_state(init, num_models, mesh)
  model_step = step_lib.make_model_step(step_lib.flax_apply_fn(model),
                                        objective, optimizer, ema_decay)
  multi_step = step_lib.make_multi_step(step_lib.make_train_step(model_step))
  shardings = jax.tree.map(lambda s: s.sharding, abstract)
  return _Program(
      abstract=abstract,
      init=state_lib.compile_init(init, abstract, options),
      step=step_lib.compile_step(multi_step, shardings, mesh, options))


class _Run:
  """The state of one `fit` call, set up in __init__ and trained by `loop`."""

  def __init__(self, config, workdir: str, task: TrainingTask,
               stop_at_step: Optional[int],
               compiler_options: Optional[Mapping[str, Any]]):
    self.config = config
    self.workdir = workdir
    self.task = task
    self.models = list(task.models)
    self.main = parallel.is_main_process()
    self.store = None
    self._build(stop_at_step, compiler_options)
    # Nothing is written before this point, so a config error leaves the
    # workdir as it was.
    self._open_workdir()
    self.seeds = parallel.put_global(
        np.array([m.seed for m in self.models], np.int32),
        parallel.model_sharding(self.mesh))
    self._log_start()

  def _build(self, stop_at_step: Optional[int],
             compiler_options: Optional[Mapping[str, Any]]) -> None:
    """Check the config and build the data source, mesh, schedule and program."""
    config = self.config
    train_config = config.train
    check_config(config)
    self.source = BatchSource(self.task.train_data,
                              [m.seed for m in self.models],
                              train_config.batch_size)
    self.mesh = parallel.make_mesh(len(self.models),
                                   config.parallel.model_axis_size)
    _check_mesh_fit(train_config, len(self.models),
                    self.mesh.shape[parallel.DATA_AXIS])
    steps_per_epoch = self.source.steps_per_epoch
    self.total_steps = int(train_config.num_epochs) * steps_per_epoch
    self.end_step = self.total_steps
    if stop_at_step is not None:
      self.end_step = min(int(stop_at_step), self.total_steps)
    self.grid_epochs = checkpoints.epoch_grid(config.checkpoint,
                                              int(train_config.num_epochs))
    self.grid_steps = {e * steps_per_epoch: e for e in self.grid_epochs}
    self.lr_fn = lr_schedules.make_learning_rate_fn(train_config,
                                                    steps_per_epoch)

    # Tracing the model here raises its own config errors (a dropout rate
    # out of range, say) before the workdir is touched.
    x_example, t_example = (np.asarray(a) for a in self.task.example_input)
    self.program = _program(
        self.task.model, self.task.objective,
        (float(train_config.adam_b1), float(train_config.adam_b2),
         float(train_config.adam_eps)),
        float(train_config.ema_decay),
        ((x_example.shape, x_example.dtype.str),
         (t_example.shape, t_example.dtype.str)),
        len(self.models), self.mesh,
        tuple(sorted(dict(compiler_options or {}).items())))
    self.run_info = run_info(config, self.task, steps_per_epoch,
                             self.grid_epochs)

  def _open_workdir(self) -> None:
    """Check run.json, then restore or create the state and open the logs.

    run.json is written with the first checkpoint (see `_save`), so a start
    that fails before it (out of memory, say) does not claim the workdir.
    """
    workdir = self.workdir
    if self.main:
      os.makedirs(workdir, exist_ok=True)
    checkpoints.check_run_info(workdir, self.run_info)
    self.run_recorded = os.path.exists(
        os.path.join(workdir, checkpoints.RUN_INFO_FILE))
    self.store = checkpoints.CheckpointStore(
        workdir, rolling_to_keep=self.config.checkpoint.rolling_to_keep,
        async_save=self.config.checkpoint.async_save)
    self._restore_or_init()
    self.metrics = _MetricsLog(
        os.path.join(workdir, METRICS_FILE), self.main, self.step,
        self.config.train.log_every_steps, self.models,
        self.source.steps_per_epoch)
    if self.main:
      _truncate_jsonl(os.path.join(workdir, EVAL_METRICS_FILE),
                      lambda record: record["step"] <= self.step)
    self.stopped_early = _stop_requested_at(
        os.path.join(workdir, EVAL_METRICS_FILE), self.step)
    if jax.process_count() > 1:
      # Only process 0 is sure to see the file; every process must agree.
      self.stopped_early = bool(multihost_utils.broadcast_one_to_all(
          np.int32(self.stopped_early)))
    if self.stopped_early:
      logger.info("An eval callback ended this run at step %d; not training "
                  "further. Remove that line of %s to continue.", self.step,
                  EVAL_METRICS_FILE)
      self.end_step = min(self.end_step, self.step)

  def _restore_or_init(self) -> None:
    latest = self.store.latest(self.source.steps_per_epoch)
    if latest is None:
      self.state = state_lib.create_state(self.program.init, self.models,
                                          self.mesh)
      self.step = 0
      return
    kind, key, step = latest
    self.state, meta = self.store.restore(kind, key, self.program.abstract)
    self.step = int(meta["step"])
    if self.step != step:
      raise ValueError(
          f"Checkpoint {kind}/{key} in {self.workdir!r} records step "
          f"{self.step}, expected {step}; the directory is corrupt.")
    logger.info("Resumed from the %s checkpoint %d at step %d.", kind, key,
                 self.step)

  def _log_start(self) -> None:
    if not self.main:
      return
    logger.info(
        "Training %d models of %d parameters on a (model %d, data %d) mesh: "
        "n = %d, %d steps per epoch, %d epochs, %d steps; grid epochs %s.",
        len(self.models),
        state_lib.count_params(self.program.abstract.params),
        self.mesh.shape[parallel.MODEL_AXIS],
        self.mesh.shape[parallel.DATA_AXIS], self.source.n,
        self.source.steps_per_epoch, self.config.train.num_epochs,
        self.total_steps, self.grid_epochs)

  # -------------------------------------------------------------------------
  # The loop.

  def loop(self, eval_callback: Optional[EvalCallback]) -> None:
    """Dispatch chunks of steps until end_step, saving at the boundaries."""
    checkpoint_config = self.config.checkpoint
    rolling_every = int(checkpoint_config.rolling_every_steps)
    rolling_seconds = 60.0 * float(checkpoint_config.rolling_every_minutes)
    last_rolling_time = time.monotonic()
    progress = tqdm.tqdm(total=self.end_step, initial=self.step, unit="step",
                         disable=not self.main, dynamic_ncols=True)
    pending = None
    with progress:
      while self.step < self.end_step:
        first = self.step
        num_steps = self._chunk_size(first, rolling_every)
        lrs = self.lr_fn(np.arange(first, first + num_steps))
        self.state, metrics = self._dispatch(first, num_steps, lrs)
        self.step = first + num_steps
        # Fetch the previous chunk's metrics only now, so the host waits on
        # them while the device already runs this chunk.
        if pending is not None:
          self._record(progress, *pending)
        pending = (first, metrics, lrs)

        grid_epoch = self.grid_steps.get(self.step)
        rolling_due = rolling_every > 0 and self.step % rolling_every == 0
        if rolling_seconds > 0 and not rolling_due:
          rolling_due = self._time_is_up(last_rolling_time, rolling_seconds)
        if grid_epoch is not None or rolling_due:
          # A checkpoint must never hold a state that the check would reject.
          self._record(progress, *pending)
          pending = None
        if grid_epoch is not None:
          self._save(checkpoints.GRID, grid_epoch)
          self._evaluate(eval_callback, grid_epoch)
        elif rolling_due:
          self._save(checkpoints.ROLLING, self.step)
        if grid_epoch is not None or rolling_due:
          last_rolling_time = time.monotonic()
      if pending is not None:
        self._record(progress, *pending)

  def _chunk_size(self, step: int, rolling_every: int) -> int:
    """Return K, or 1 when a boundary falls inside the next K steps.

    Only two scan lengths are ever compiled, K and 1.
    """
    k = int(self.config.train.steps_per_dispatch)
    boundaries = [self.end_step]
    boundaries += [s for s in self.grid_steps if s > step]
    if rolling_every > 0:
      boundaries.append((step // rolling_every + 1) * rolling_every)
    return k if step + k <= min(boundaries) else 1

  def _time_is_up(self, since: float, seconds: float) -> bool:
    due = time.monotonic() - since >= seconds
    if jax.process_count() > 1:
      # Every process must take the same decision, because saving is collective.
      due = bool(multihost_utils.broadcast_one_to_all(np.int32(due)))
    return due

  def _dispatch(self, first: int, num_steps: int, lrs: np.ndarray):
    shape = self.source.batch_shape(num_steps)
    sharding = parallel.batch_sharding(self.mesh)
    box = parallel.process_local_box(sharding, shape)
    x0_local, valid_local = self.source.local_batches(first, num_steps, box)
    x0 = jax.make_array_from_process_local_data(sharding, x0_local, shape)
    valid = jax.make_array_from_process_local_data(sharding, valid_local,
                                                   shape[:3])
    lr = parallel.put_global(lrs, parallel.replicated_sharding(self.mesh))
    return self.program.step(self.state, self.seeds, x0, valid, lr)

  def _record(self, progress, first: int, metrics, lrs: np.ndarray) -> None:
    metrics = {name: np.asarray(value)
               for name, value in jax.device_get(metrics).items()}
    self.metrics.add(first, metrics, lrs)
    steps_done = first + len(lrs)
    # Completed epochs, the numbering that grid checkpoints use.
    progress.set_postfix(loss=f"{float(np.mean(metrics['loss'][-1])):.4f}",
                         epoch=steps_done // self.source.steps_per_epoch,
                         refresh=False)
    progress.update(len(lrs))

  def _save(self, kind: str, key: int) -> None:
    steps_per_epoch = self.source.steps_per_epoch
    meta = {
        "kind": kind,
        "step": self.step,
        "epoch": self.step // steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "config": json.loads(self.config.to_json()),
        "models": [m.to_json() for m in self.models],
        "fingerprint": json.loads(json.dumps(dict(self.task.fingerprint))),
    }
    if self.main and not self.run_recorded:
      checkpoints.write_run_info(self.workdir, self.run_info)
    self.run_recorded = True
    self.store.save(kind, key, self.state, meta)
    if kind == checkpoints.GRID and self.main:
      checkpoints.record_grid_checkpoint(self.workdir, key, self.step)

  def _evaluate(self, eval_callback: Optional[EvalCallback], epoch: int) -> None:
    if eval_callback is None:
      return
    point = GridPoint(epoch=epoch, step=self.step, state=self.state,
                      models=self.models, mesh=self.mesh)
    result = eval_callback(point)
    if result is not None and self.main:
      record = {"epoch": epoch, "step": self.step, **dict(result)}
      with open(os.path.join(self.workdir, EVAL_METRICS_FILE), "a") as f:
        f.write(json.dumps(record) + "\n")
    stop = result is not None and bool(result.get(STOP_TRAINING_KEY, False))
    if jax.process_count() > 1:
      # Every process must leave the loop at the same step.
      stop = bool(multihost_utils.broadcast_one_to_all(np.int32(stop)))
    if stop:
      logger.info("The eval callback ended training at epoch %d (step %d).",
                  epoch, self.step)
      self.stopped_early = True
      self.end_step = self.step

  def close(self) -> None:
    if self.store is not None:
      self.store.wait()
      self.store.close()
