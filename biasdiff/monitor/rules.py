"""Stopping rules: which checkpoint to release, and when to stop training.

Every rule reads one statistic over the checkpoints seen so far (a curve in
checkpoint order) and returns a decision with two indices:

- release: the checkpoint the rule would publish;
- stop: the checkpoint at which the rule is certain of its choice, where
  training can end. None while the rule has not fired.

Kinds of rule:

- "minimum" (the sample-split divergence or the test loss): the running
  minimum improves when a value falls below best - min_delta. The rule fires
  once `patience` checkpoints have passed without an improvement; it releases
  the best checkpoint and stops at best + patience. Before it fires, the
  release is the best checkpoint so far, marked unconfirmed.
- "threshold" (the MIA AUC or the divergence exceeding a bias budget): the rule
  is armed once the statistic is at or below the threshold, and fires at the
  first later checkpoint where it is strictly above. It stops there and
  releases the checkpoint before, the last one within the budget. Arming
  first matters for the divergence, which starts high while two freshly
  initialised models disagree and falls before it rises again.

Each decision records the test loss at the released checkpoint and what it
gives up relative to the minimum test loss of the same curve:
cost = L(release) - min_k L(k) and relative cost = cost / min_k L(k).
"""

import dataclasses
import logging
import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

MINIMUM = "minimum"
THRESHOLD = "threshold"

# The rules a config may name in monitor.rules: kind and statistic of each.
# Thresholds and patience come from the config fields of the same names.
RULES = {
    "divergence_minimum": (MINIMUM, "divergence"),
    "test_loss_minimum": (MINIMUM, "test_loss"),
    "mia_auc_threshold": (THRESHOLD, "mia_auc"),
    "divergence_threshold": (THRESHOLD, "divergence"),
}


@dataclasses.dataclass(frozen=True)
class RuleSpec:
  """One stopping rule."""

  name: str  # label in records and figures
  kind: str  # MINIMUM or THRESHOLD
  statistic: str  # key of the statistic in a monitor record, e.g. "divergence"
  patience: int = 1  # MINIMUM: checkpoints without improvement before firing; >= 1
  min_delta: float = 0.0  # MINIMUM: an improvement must beat the best by more than this; >= 0
  threshold: float = math.nan  # THRESHOLD: the bias budget

  def __post_init__(self):
    if self.kind not in (MINIMUM, THRESHOLD):
      raise ValueError(f"Rule {self.name!r} has kind {self.kind!r}; use {MINIMUM!r} or "
                       f"{THRESHOLD!r}.")
    if self.kind == MINIMUM and (self.patience < 1 or self.min_delta < 0):
      raise ValueError(f"Rule {self.name!r} needs patience >= 1 and min_delta >= 0, got "
                       f"{self.patience} and {self.min_delta}.")
    if self.kind == THRESHOLD and not math.isfinite(self.threshold):
      raise ValueError(f"Rule {self.name!r} needs a finite threshold, got {self.threshold}.")


@dataclasses.dataclass(frozen=True)
class Decision:
  """The checkpoints a rule picks on a curve, and the test loss they give up."""

  name: str
  statistic: str
  fired: bool  # True once the rule is certain (stop_index is set)
  release_index: Optional[int]  # checkpoint to publish; None if none qualifies yet
  stop_index: Optional[int]  # checkpoint where the rule fired
  release_epoch: Optional[int]
  stop_epoch: Optional[int]
  release_step: Optional[int]
  release_value: Optional[float]  # the statistic at the released checkpoint
  test_loss_at_release: Optional[float]
  test_loss_cost: Optional[float]  # L(release) - min L over the curve
  test_loss_cost_relative: Optional[float]  # the cost over min L

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def minimum_with_patience(values: Sequence[float], patience: int,
                          min_delta: float = 0.0) -> tuple[int, Optional[int]]:
  """Return (best index, firing index or None) of an early-stopping minimum.

  Index i improves on the best b when values[i] < values[b] - min_delta. The
  rule fires at the first i with i - b >= patience, where b is the best index
  among 0 ... i.
  """
  values = _curve(values)
  if patience < 1:
    raise ValueError(f"patience must be >= 1 checkpoint, got {patience}.")
  best = 0
  for i in range(1, values.size):
    if values[i] < values[best] - min_delta:
      best = i
    if i - best >= patience:
      return best, i
  return best, None


def upward_crossing(values: Sequence[float],
                    threshold: float) -> tuple[Optional[int], Optional[int]]:
  """Return (release index, firing index) of the first upward crossing of a threshold.

  The rule is armed at the first index with value <= threshold and fires at
  the first later index with value > threshold; the release is the index
  just before. (None, None) until it fires.
  """
  values = _curve(values)
  armed = False
  for i, value in enumerate(values):
    if value <= threshold:
      armed = True
    elif armed:
      return i - 1, i
  return None, None


def _curve(values: Sequence[float]) -> np.ndarray:
  array = np.asarray(values, dtype=np.float64)
  if array.ndim != 1 or array.size < 1:
    raise ValueError(f"A rule needs a 1-D curve with at least one checkpoint, got {array.shape}.")
  if not np.all(np.isfinite(array)):
    raise ValueError(f"The curve contains NaN or infinite values: {array.tolist()}.")
  return array


def decide(spec: RuleSpec, values: Sequence[float], test_loss: Sequence[float],
           epochs: Sequence[int], steps: Sequence[int]) -> Decision:
  """Apply one rule to curves over the same checkpoints, in checkpoint order."""
  values = _curve(values)
  test_loss = _curve(test_loss)
  if not values.size == test_loss.size == len(epochs) == len(steps):
    raise ValueError(
        f"Rule {spec.name!r}: the statistic ({values.size}), test loss ({test_loss.size}), epochs "
        f"({len(epochs)}) and steps ({len(steps)}) must have one entry per checkpoint.")
  if spec.kind == MINIMUM:
    release, stop = minimum_with_patience(values, spec.patience, spec.min_delta)
  else:
    release, stop = upward_crossing(values, spec.threshold)
  best_loss = float(test_loss.min())
  cost = None if release is None else float(test_loss[release] - best_loss)
  relative = None if cost is None or best_loss == 0 else cost / best_loss
  return Decision(
      name=spec.name,
      statistic=spec.statistic,
      fired=stop is not None,
      release_index=release,
      stop_index=stop,
      release_epoch=None if release is None else int(epochs[release]),
      stop_epoch=None if stop is None else int(epochs[stop]),
      release_step=None if release is None else int(steps[release]),
      release_value=None if release is None else float(values[release]),
      test_loss_at_release=None if release is None else float(test_loss[release]),
      test_loss_cost=cost,
      test_loss_cost_relative=relative)


def rules_from_config(monitor_config) -> list[RuleSpec]:
  """Build the rules named in monitor_config.rules, with its patience and thresholds."""
  specs = []
  for name in monitor_config.rules:
    if name not in RULES:
      raise ValueError(f"Unknown stopping rule {name!r} in monitor.rules; choose from "
                       f"{sorted(RULES)}.")
    kind, statistic = RULES[name]
    if kind == MINIMUM:
      specs.append(RuleSpec(name, kind, statistic, patience=int(monitor_config.patience),
                            min_delta=float(monitor_config.min_delta)))
    else:
      threshold = float(monitor_config[f"{statistic}_threshold"])
      specs.append(RuleSpec(name, kind, statistic, threshold=threshold))
  stop_rule = monitor_config.stop_rule
  if monitor_config.stop_training and stop_rule not in [s.name for s in specs]:
    raise ValueError(
        f"monitor.stop_rule={stop_rule!r} must be one of monitor.rules "
        f"{list(monitor_config.rules)} when monitor.stop_training is True.")
  return specs


def evaluate_rules(specs: Sequence[RuleSpec],
                   history: Sequence[Mapping[str, Any]]) -> dict[str, Decision]:
  """Apply every rule to a history of monitor records, one per checkpoint in order.

  Each record has "epoch", "step", "test_loss" and the rules' statistics.
  A rule whose statistic is missing (for example the divergence of a run
  without disjoint pairs) is skipped with a warning.
  """
  if not history:
    return {}
  epochs = [int(r["epoch"]) for r in history]
  steps = [int(r["step"]) for r in history]
  test_loss = [r["test_loss"] for r in history]
  decisions = {}
  for spec in specs:
    if any(spec.statistic not in r for r in history):
      logger.warning("Rule %s skipped: the records have no %r statistic.", spec.name,
                     spec.statistic)
      continue
    values = [r[spec.statistic] for r in history]
    decisions[spec.name] = decide(spec, values, test_loss, epochs, steps)
  return decisions
