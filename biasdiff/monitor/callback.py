"""The trainer hook: bias statistics and stopping rules at every grid checkpoint.

A `Monitor` draws its probe inputs once (see `biasdiff.monitor.statistics`),
then at each grid checkpoint measures the stacked models with one jitted call,
appends the summary to its history and applies the stopping rules to the
history. Used as `fit(..., eval_callback=monitor)`, it returns the record

  {"monitor": {...statistics...}, "monitor_rules": {rule: decision},
   "stop_training": bool}

which the trainer appends to eval_metrics.jsonl. With
monitor.stop_training = True, "stop_training" turns True when
monitor.stop_rule fires and the trainer ends the run there.

The monitor only reads the parameters. It never touches the optimizer state or
the training randomness, so a run with it trains bit-identical weights.

Builders: `hierarchical_monitor(config, workdir)` for the tree data;
`image_monitor(network, schedule, models, heldout, blocks, centres, config)`
for an eps-predicting image network, whose pipeline passes its own images and
centring constants (biasdiff.pipeline.images registers the builder of image
runs). More frequent measurements come from a denser checkpoint grid
(checkpoint.grid = "linear" and a larger grid_size), which also keeps a
checkpoint at every point a rule can release.

A zoo trained in several `fit` calls, one group of models after another, is
measured whole: a monitor given `earlier_parameters` puts the earlier groups'
grid checkpoints of the same epoch in front of the fit's own models.
"""

import json
import logging
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from biasdiff import diffusion
from biasdiff.metrics import probes
from biasdiff.monitor import rules as rules_lib
from biasdiff.monitor import statistics
from biasdiff.training import checkpoints
from biasdiff.training import loop
from biasdiff.training import state as state_lib

logger = logging.getLogger(__name__)

MONITOR_KEY = "monitor"
RULES_KEY = "monitor_rules"


def check_config(monitor_config) -> None:
  """Raise ValueError naming the first field of the monitor section that is out of range."""
  for name in ("split_heldout_examples", "split_repeats", "mia_repeats", "batch_size"):
    probes.check_positive_int(monitor_config[name], f"monitor.{name}")
  for name in ("loss_examples", "mia_examples"):
    if probes.check_positive_int(monitor_config[name], f"monitor.{name}") < 2:
      raise ValueError(f"monitor.{name}={monitor_config[name]} must be >= 2 for a standard error.")
  probes.check_nonnegative_int(monitor_config.split_train_examples, "monitor.split_train_examples")
  if not 0.0 <= monitor_config.mia_fpr < 1.0:
    raise ValueError(f"monitor.mia_fpr={monitor_config.mia_fpr} must lie in [0, 1).")
  rules_lib.rules_from_config(monitor_config)


def _capped(requested: int, available: int, name: str) -> int:
  if requested > available:
    logger.info("monitor.%s=%d exceeds the %d available examples; using %d.", name, requested,
                available, available)
  return min(requested, available)


class Monitor:
  """Bias statistics of a model stack on fixed probes, with stopping rules.

  Args:
    adapter: a `statistics.SequenceAdapter` or `statistics.ImageAdapter`.
    models: the run's model list; model m trains on block models[m].block.
    heldout: [N_h, *example] clean held-out examples (never trained on), in
      the order of their held-out indices 0 ... N_h - 1.
    blocks: block -> [n, *example] the clean training examples of that block
      (uncentred for images), row i being block row i.
    monitor_config: the `monitor` config section (configs.monitor_section()).
    workdir: a run directory whose eval_metrics.jsonl contains earlier records;
      they seed the history when a run resumes.
    use_ema: measure the parameter EMA when the state has one.
    earlier_parameters: for a zoo trained in groups, a function (epoch,
      use_ema) -> stacked parameters [K, ...] of models[:K], the models that
      earlier `fit` calls trained, at that grid epoch. The fit's own models are
      models[K:]. None when the fit trains every model.
  """

  def __init__(self, adapter, models: Sequence[state_lib.ModelSpec], heldout: Any,
               blocks: Mapping[int, Any], monitor_config, *, workdir: Optional[str] = None,
               use_ema: bool = True,
               earlier_parameters: Optional[Callable[[int, bool], Any]] = None):
    check_config(monitor_config)
    self.adapter = adapter
    self.models = list(models)
    self.config = monitor_config
    self.use_ema = bool(use_ema)
    self.earlier_parameters = earlier_parameters
    self.layout = statistics.make_layout([m.block for m in self.models])
    if len(self.layout.pairs) == 0:
      logger.warning("The monitor's %d models share one block: no sample-split divergence and no "
                     "membership attack, only the loss gap.", len(self.models))
    missing = [int(b) for b in self.layout.blocks if int(b) not in blocks]
    if missing:
      raise ValueError(f"The monitor needs the training examples of blocks {missing}; pass them "
                       "in `blocks`.")
    schedule = adapter.schedule
    self.t_split = probes.time_at_fraction(monitor_config.split_time_fraction, schedule.num_steps)
    self.t_mia = probes.time_at_fraction(monitor_config.mia_time_fraction, schedule.num_steps)
    self.t_split = probes.check_time(schedule, self.t_split, "monitor t*")
    self.t_mia = probes.check_time(schedule, self.t_mia, "monitor membership time")
    blocks = {int(b): np.asarray(v) for b, v in blocks.items()}
    self.probes, self.sizes = self._build_probes(np.asarray(heldout), blocks)
    self.nonmember_overlap = self._nonmember_overlap(blocks)
    self.specs = rules_lib.rules_from_config(monitor_config)
    self.measure_fn = statistics.make_measure(adapter, self.layout.pairs, len(self.models),
                                              monitor_config.batch_size)
    self.history: list[dict] = []
    if workdir is not None:
      self.history = read_history(workdir)
    self.seconds: list[float] = []

  def _build_probes(self, heldout: np.ndarray, blocks: dict) -> tuple:
    c = self.config
    block_size = min(blocks[int(b)].shape[0] for b in self.layout.blocks)
    sizes = {
        "split_heldout_examples": _capped(c.split_heldout_examples, heldout.shape[0],
                                          "split_heldout_examples"),
        "split_train_examples": _capped(c.split_train_examples, block_size, "split_train_examples"),
        "loss_examples": _capped(c.loss_examples, min(block_size, heldout.shape[0]),
                                 "loss_examples"),
        "mia_examples": _capped(c.mia_examples, block_size, "mia_examples"),
    }
    request = statistics.ProbeRequest
    block_set = lambda b: probes.training_set_id(int(b))
    num_split, num_train = sizes["split_heldout_examples"], sizes["split_train_examples"]
    num_loss, num_mia = sizes["loss_examples"], sizes["mia_examples"]
    # Sets in order: held-out at t*, held-out at random t, then per block
    # (training at t*, at t_mia), then per model its own block at random t.
    requests = [request(heldout[:num_split], probes.HELDOUT_SET, self.t_split, c.split_repeats),
                request(heldout[:num_loss], probes.HELDOUT_SET)]
    for b in self.layout.blocks:
      if num_train:
        requests.append(request(blocks[int(b)][:num_train], block_set(b), self.t_split,
                                c.split_repeats))
      requests.append(request(blocks[int(b)][:num_mia], block_set(b), self.t_mia, c.mia_repeats))
    requests += [request(blocks[m.block][:num_loss], block_set(m.block)) for m in self.models]
    sets = statistics.build_probe_sets(self.adapter, c.seed, requests)

    as_tuple = lambda s: (s.x0, s.t, s.noise)
    split_heldout, loss_heldout = sets[0], sets[1]
    per_block = sets[2:len(sets) - len(self.models)]
    own = sets[len(sets) - len(self.models):]
    split_train = None
    if num_train:
      split_train = as_tuple(statistics.concatenate_probe_sets(per_block[0::2]))
      mia_sets = per_block[1::2]
    else:
      mia_sets = per_block
    loss_own = tuple(jax.numpy.stack(parts) for parts in zip(*(as_tuple(s) for s in own)))
    monitor_probes = statistics.MonitorProbes(
        split_heldout=as_tuple(split_heldout), split_train=split_train,
        loss_heldout=as_tuple(loss_heldout), loss_own=loss_own,
        mia=as_tuple(statistics.concatenate_probe_sets(mia_sets)))
    return monitor_probes, sizes

  def _nonmember_overlap(self, blocks: dict) -> list:
    """[P][2] fraction of each attack's non-member probes whose content is in the model's block.

    Blocks are disjoint by index, not by content; a non-member that equals a
    training example of the attacked model caps the attack's AUC below 1.
    """
    num_mia = self.sizes["mia_examples"]
    overlap = []
    for a, b in self.layout.pairs:
      block_a, block_b = blocks[self.models[a].block], blocks[self.models[b].block]
      overlap.append([content_overlap(block_b[:num_mia], block_a),
                      content_overlap(block_a[:num_mia], block_b)])
    if overlap:
      logger.info("Membership probes: %.1f%% of the non-members equal a member in content.",
                  100 * float(np.mean(overlap)))
    return overlap

  @property
  def forward_passes(self) -> int:
    """Single-example network evaluations per checkpoint, all models together."""
    return statistics.forward_passes(
        len(self.models), self.layout.blocks.size,
        split_heldout_examples=self.sizes["split_heldout_examples"],
        split_train_examples=self.sizes["split_train_examples"],
        split_repeats=self.config.split_repeats, loss_examples=self.sizes["loss_examples"],
        mia_examples=self.sizes["mia_examples"], mia_repeats=self.config.mia_repeats)

  def measure(self, params: Any) -> dict:
    """Measure stacked parameters [M, ...]; returns the JSON summary of `statistics.summarise`."""
    start = time.perf_counter()
    raw = _to_host(self.measure_fn(params, self.probes))
    record = statistics.summarise(
        raw, self.layout, split_repeats=self.config.split_repeats,
        mia_examples=self.sizes["mia_examples"], mia_repeats=self.config.mia_repeats,
        split_train_examples=self.sizes["split_train_examples"], fpr=self.config.mia_fpr)
    seconds = time.perf_counter() - start
    self.seconds.append(seconds)
    record.update({"t_split": self.t_split, "t_mia": self.t_mia, "seconds": seconds,
                   "forward_passes": self.forward_passes})
    if "per_pair" in record:
      record["per_pair"]["mia_nonmember_overlap"] = self.nonmember_overlap
      record["mia_nonmember_overlap"] = float(np.mean(self.nonmember_overlap))
    return record

  def observe(self, epoch: int, step: int, record: dict) -> dict:
    """Add a checkpoint's record to the history and return the rules' decisions.

    Records at or after `step` (from a run that resumed at an earlier
    checkpoint) are dropped first.
    """
    self.history = [r for r in self.history if r["step"] < step]
    self.history.append({"epoch": int(epoch), "step": int(step), **record})
    return rules_lib.evaluate_rules(self.specs, self.history)

  def with_earlier_models(self, params: Any, epoch: int, use_ema: bool) -> Any:
    """Put the earlier groups' models in front of the stacked `params` and check the count."""
    if self.earlier_parameters is not None:
      earlier = self.earlier_parameters(epoch, use_ema)
      params = jax.tree.map(lambda a, b: jax.numpy.concatenate([a, b], axis=0), earlier, params)
    count = jax.tree.leaves(params)[0].shape[0]
    if count != len(self.models):
      raise ValueError(f"The monitor measures {len(self.models)} models but got parameters of "
                       f"{count}; pass earlier_parameters for models trained in earlier fits.")
    return params

  def load_checkpoint(self, workdir: str, epoch: int) -> tuple[Any, dict]:
    """Load grid checkpoint `epoch` of run `workdir` with the earlier groups' models in front.

    Returns (params, meta) as `checkpoints.load_grid_checkpoint` does.
    """
    params, meta = checkpoints.load_grid_checkpoint(workdir, epoch, use_ema=self.use_ema)
    return self.with_earlier_models(params, epoch, self.use_ema), meta

  def __call__(self, point: loop.GridPoint) -> dict:
    """The eval callback of `biasdiff.training.fit`."""
    state = point.state
    use_ema = self.use_ema and state.ema_params is not None
    params = state.ema_params if use_ema else state.params
    record = self.measure(self.with_earlier_models(params, point.epoch, use_ema))
    record["parameters"] = "ema" if use_ema else "raw"
    decisions = self.observe(point.epoch, point.step, record)
    stop = False
    if self.config.stop_training:
      decision = decisions.get(self.config.stop_rule)
      stop = decision is not None and decision.fired
    _log_checkpoint(point.epoch, record, decisions, stop)
    return {MONITOR_KEY: record,
            RULES_KEY: {name: d.to_json() for name, d in decisions.items()},
            loop.STOP_TRAINING_KEY: stop}


def content_overlap(queries: np.ndarray, reference: np.ndarray) -> float:
  """Return the fraction of query examples equal, value for value, to some reference example."""
  known = {row.tobytes() for row in np.ascontiguousarray(reference)}
  rows = np.ascontiguousarray(queries.astype(reference.dtype))
  return float(np.mean([row.tobytes() in known for row in rows]))


def _to_host(tree: Any) -> dict:
  """Fetch device arrays as numpy, gathering shards from every process."""
  if jax.process_count() > 1:
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return {name: np.asarray(value) for name, value in jax.device_get(tree).items()}


def _log_checkpoint(epoch: int, record: dict, decisions: dict, stop: bool) -> None:
  parts = [f"test loss {record['test_loss']:.4f}", f"loss gap {record['loss_gap']:+.4f}"]
  if "divergence" in record:
    parts.append(f"divergence {record['divergence']:.4f}")
    parts.append(f"MIA AUC {record['mia_auc']:.3f}, TPR {record['mia_tpr']:.3f}")
  fired = [name for name, d in decisions.items() if d.fired]
  logger.info("Monitor at epoch %d (%.1f s): %s; rules fired: %s%s", epoch, record["seconds"],
              ", ".join(parts), ", ".join(fired) or "none", "; stopping" if stop else "")


def read_history(workdir: str) -> list[dict]:
  """Return the monitor records of a run's eval_metrics.jsonl, with epoch and step, in order."""
  path = os.path.join(workdir, loop.EVAL_METRICS_FILE)
  if not os.path.exists(path):
    return []
  history = []
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      record = json.loads(line)
      if MONITOR_KEY in record:
        history.append({"epoch": record["epoch"], "step": record["step"], **record[MONITOR_KEY]})
  return sorted(history, key=lambda r: r["step"])


def combine_callbacks(*callbacks: Optional[loop.EvalCallback]) -> loop.EvalCallback:
  """Merge the records of several eval callbacks; training stops if any of them requests it."""
  active = [c for c in callbacks if c is not None]

  def combined(point: loop.GridPoint) -> Optional[dict]:
    merged, stop = {}, False
    for callback in active:
      result = callback(point)
      if result is None:
        continue
      result = dict(result)
      stop = stop or bool(result.pop(loop.STOP_TRAINING_KEY, False))
      clash = set(merged) & set(result)
      if clash:
        raise ValueError(f"Eval callbacks return the same keys {sorted(clash)}; rename one.")
      merged.update(result)
    if not merged and not stop:
      return None
    merged[loop.STOP_TRAINING_KEY] = stop
    return merged

  return combined


# ---------------------------------------------------------------------------
# Builders.


def hierarchical_monitor(config, workdir: str, monitor_config=None, *,
                         read_records: bool = True) -> Monitor:
  """Build the monitor of a tree-data run from its config (configs/hierarchical.py).

  Held-out probes come from the held-out pool, training probes from the
  prefix of each block; the network is the run's transformer in float32.
  With read_records, the history starts from the run's eval_metrics.jsonl.
  """
  from biasdiff.training import tasks  # the tree-data task pulls in the corpus code
  from biasdiff.metrics import sequences as seq_metrics
  monitor_config = config.monitor if monitor_config is None else monitor_config
  corpus = tasks.load_corpus(config, workdir)
  models = tasks.zoo(config)
  n = config.data.n
  schedule = diffusion.sequence_schedule(config.diffusion.num_steps)
  network = tasks.transformer(config).clone(dtype=jax.numpy.float32)
  adapter = statistics.SequenceAdapter(statistics.stack_apply(network), schedule,
                                       config.data.num_symbols,
                                       matmul_precision=seq_metrics.MATMUL_PRECISION)
  needed = max(monitor_config.split_heldout_examples, monitor_config.loss_examples)
  heldout = corpus.heldout(0, min(needed, corpus.heldout_pool.shape[0]))
  blocks = {m.block: corpus.training_block(m.block, n) for m in models}
  use_ema = monitor_config.use_ema and config.train.ema_decay > 0
  return Monitor(adapter, models, heldout, blocks, monitor_config,
                 workdir=workdir if read_records else None, use_ema=use_ema)


def image_monitor(network, schedule: diffusion.Schedule, models: Sequence[state_lib.ModelSpec],
                  heldout: Any, blocks: Mapping[int, Any], centres: Any, monitor_config, *,
                  workdir: Optional[str] = None, use_ema: bool = True,
                  earlier_parameters: Optional[Callable[[int, bool], Any]] = None) -> Monitor:
  """Build the monitor of an eps-predicting image run.

  Args:
    network: the U-Net (flax module called as apply(params, x_t, t, train=False)).
    schedule: the DDPM schedule the run trains with.
    models: the run's model list, earlier groups' models first (see `Monitor`).
    heldout: [N_h, H, W, C] uncentred held-out images in [0, 1].
    blocks: block -> [n, H, W, C] uncentred training images of the block.
    centres: [M] scalar centre of each model (block centring) or [M, H, W, C].
    monitor_config: the monitor config section.
    workdir, use_ema, earlier_parameters: as in `Monitor`.
  """
  heldout = np.asarray(heldout, np.float32)
  centres = np.asarray(centres, np.float32)
  if centres.ndim == 1:
    centres = np.broadcast_to(centres[:, None, None, None],
                              (centres.shape[0],) + heldout.shape[1:]).copy()
  if centres.shape[0] != len(models):
    raise ValueError(f"centres has {centres.shape[0]} rows for {len(models)} models; give one "
                     "centre per model.")
  adapter = statistics.ImageAdapter(statistics.stack_apply(network), schedule, centres,
                                    divergence_kind=monitor_config.image_divergence)
  return Monitor(adapter, models, heldout, blocks, monitor_config, workdir=workdir,
                 use_ema=use_ema, earlier_parameters=earlier_parameters)


# config.experiment -> builder(config, workdir, monitor_config, read_records=bool) -> Monitor.
# An experiment registers its builder with `register_builder`; audits and
# monitor_from_config find it here.
BUILDERS: dict[str, Callable[..., Monitor]] = {"hierarchical": hierarchical_monitor}


def register_builder(experiment: str, builder: Callable[..., Monitor]) -> None:
  """Make `builder` the monitor builder of runs whose config.experiment is `experiment`."""
  BUILDERS[experiment] = builder


def build_monitor(config, workdir: str, monitor_config=None, *,
                  read_records: bool = True) -> Monitor:
  """Build the monitor of a run from its training config, with the registered builder."""
  builder = BUILDERS.get(config.experiment)
  if builder is None:
    raise ValueError(
        f"No monitor builder for config.experiment={config.experiment!r}; known: "
        f"{sorted(BUILDERS)}. Register one with biasdiff.monitor.register_builder (see "
        "image_monitor for image models).")
  monitor_config = config.monitor if monitor_config is None else monitor_config
  return builder(config, workdir, monitor_config, read_records=read_records)


def monitor_from_config(config, workdir: str) -> Optional[Monitor]:
  """Return the monitor of a training config when config.monitor.enabled, else None."""
  if "monitor" not in config or not config.monitor.enabled:
    return None
  return build_monitor(config, workdir)
