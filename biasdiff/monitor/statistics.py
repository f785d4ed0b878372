"""Cheap bias statistics of a model stack on fixed probes, and the membership-inference score.

Three statistics follow a stack of models [M, ...] during training. Every one
uses probe inputs whose noise is fold(seed, PROBE, set, index, t, r) (see
`biasdiff.metrics.probes`), so every checkpoint is measured on the same inputs.

- Sample-split divergence at t* = floor(0.15 T), for every pair (A, B) of
  models trained on disjoint blocks, on shared held-out inputs x_s:
    sequences: D_AB(s) = sum_i KL(p_A(x_s)_i || p_B(x_s)_i) in nats, summed
      over the L positions of the x0-predictions;
    images:    D_AB(s) = 1 - <e_A, e_B> / max(|e_A| |e_B|, 1e-8) of the
      predicted noises ("cosine"), or mean over pixels of (e_A - e_B)^2 ("mse").
  The same divergence is also taken on the training inputs of each block.
- Train/held-out gap of the denoising loss, each model m on its own block:
    gap_m = mean_{x in own block} l_m(x) - mean_{x in held-out} l_m(x),
  where l is the per-example training loss at one random time per example
  (token-mean cross-entropy for sequences, pixel-mean squared noise error for
  images). A memorising model has gap < 0. The held-out term is the test loss.
- Membership inference: for a pair (A, B) on disjoint blocks, A's members are
  block A and its non-members block B, which A never saw. The score of
  example x is s_A(x) = -mean_r l_A(x, t_mia, eps_r) at a small fixed time,
  so a lower loss means "more likely a member". Reported per direction:
    AUC = P(s(member) > s(non-member)) + P(equal) / 2   (Mann-Whitney U),
    TPR at FPR f: the fraction of A's members with s_A > tau, where tau is
  calibrated on the *other* model: the smallest of B's scores on B's own
  non-members (block A) such that at most a fraction f of them exceed it.
  The labels being scored never set the threshold.

Network evaluations run on device in one jitted call per checkpoint
(`make_measure`); the AUC, threshold and summaries are exact float64 numpy on
the host (`summarise`).
"""

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from biasdiff import diffusion
from biasdiff import rng
from biasdiff.metrics import images as image_metrics
from biasdiff.metrics import probes
from biasdiff.metrics import sequences as seq_metrics
from biasdiff.metrics import stats

# Image divergences between two predicted noises.
IMAGE_DIVERGENCES = ("cosine", "mse")
# Repetition index of the random-time loss probes, as in the loss decomposition
# of `biasdiff.metrics.sequences`, so they do not share the noise of the
# fixed-time probes (repetitions 0 ... R - 1) at the same t.
LOSS_REPETITION = 1


# ---------------------------------------------------------------------------
# Membership inference on the host.


def _scores(values: Any, name: str) -> np.ndarray:
  array = np.asarray(values, dtype=np.float64)
  if array.ndim != 1 or array.size < 1:
    raise ValueError(f"{name} must be a non-empty 1-D array of scores, got shape {array.shape}.")
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{name} contains NaN or infinite scores; check the model's losses.")
  return array


def _midranks(values: np.ndarray) -> np.ndarray:
  """Ranks 1 ... n of values, with tied values sharing the mean of their ranks."""
  order = np.argsort(values, kind="mergesort")
  sorted_values = values[order]
  # Start of each run of equal values in the sorted order.
  starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
  ends = np.r_[starts[1:], values.size]
  run_ranks = (starts + 1 + ends) / 2.0  # mean of the 1-based ranks starts+1 ... ends
  ranks = np.empty(values.size, dtype=np.float64)
  ranks[order] = np.repeat(run_ranks, ends - starts)
  return ranks


def roc_auc(member_scores: Any, nonmember_scores: Any) -> float:
  """Compute the ROC AUC of scores where higher means "member", exactly, with ties.

  AUC = U / (n1 n0) with the Mann-Whitney statistic
    U = R_1 - n1 (n1 + 1) / 2,
  R_1 being the sum of the members' mid-ranks in the pooled sample. This
  equals the pair count sum_{i, j} (1[s_i > s'_j] + 1[s_i = s'_j] / 2) / (n1 n0).
  """
  members = _scores(member_scores, "member_scores")
  nonmembers = _scores(nonmember_scores, "nonmember_scores")
  ranks = _midranks(np.concatenate([members, nonmembers]))
  n1, n0 = members.size, nonmembers.size
  u_statistic = ranks[:n1].sum() - n1 * (n1 + 1) / 2.0
  return float(u_statistic / (n1 * n0))


def auc_standard_error(member_scores: Any, nonmember_scores: Any) -> float:
  """Compute DeLong's standard error of the ROC AUC.

  With the placements V1_i = (#{j: s'_j < s_i} + #{j: s'_j = s_i} / 2) / n0 of
  each member and V0_j = (#{i: s_i > s'_j} + #{i: s_i = s'_j} / 2) / n1 of each
  non-member, SE^2 = var(V1) / n1 + var(V0) / n0 (sample variances, ddof 1).
  NaN when either group has fewer than two scores.
  """
  members = _scores(member_scores, "member_scores")
  nonmembers = _scores(nonmember_scores, "nonmember_scores")
  n1, n0 = members.size, nonmembers.size
  if n1 < 2 or n0 < 2:
    return float("nan")
  pooled = _midranks(np.concatenate([members, nonmembers]))
  # Rank among the pooled sample minus rank within the own group counts the
  # other group's scores below (ties count one half).
  placements_1 = (pooled[:n1] - _midranks(members)) / n0
  placements_0 = 1.0 - (pooled[n1:] - _midranks(nonmembers)) / n1
  variance = np.var(placements_1, ddof=1) / n1 + np.var(placements_0, ddof=1) / n0
  return float(np.sqrt(variance))


def null_auc_standard_error(num_members: int, num_nonmembers: int) -> float:
  """Return the SE of the AUC when members and non-members are exchangeable (no ties).

  SE = sqrt((n1 + n0 + 1) / (12 n1 n0)), the null variance of U / (n1 n0).
  """
  n1 = probes.check_positive_int(num_members, "num_members")
  n0 = probes.check_positive_int(num_nonmembers, "num_nonmembers")
  return math.sqrt((n1 + n0 + 1) / (12.0 * n1 * n0))


def calibrate_threshold(reference_nonmember_scores: Any, fpr: float) -> float:
  """Return the threshold at which at most a fraction `fpr` of reference non-members pass.

  With the reference scores sorted in decreasing order s_(1) >= s_(2) >= ...
  and k = floor(fpr n), tau = s_(k+1). The rule "member iff s > tau" then
  flags at most k of the n reference non-members (fewer when scores tie at tau).
  """
  scores = _scores(reference_nonmember_scores, "reference_nonmember_scores")
  if not 0.0 <= fpr < 1.0:
    raise ValueError(f"fpr must lie in [0, 1), got {fpr}.")
  k = int(math.floor(fpr * scores.size))
  return float(np.sort(scores)[::-1][k])


def positive_rate(scores: Any, threshold: float) -> float:
  """Return the fraction of scores strictly above the threshold."""
  return float(np.mean(_scores(scores, "scores") > threshold))


class MembershipInference(NamedTuple):
  """A membership-inference attack on one model."""
  auc: float  # ROC AUC of members vs non-members (0.5 = no signal)
  auc_se: float  # DeLong standard error
  threshold: float  # tau, calibrated on the other model's non-member scores
  tpr: float  # fraction of members with score > tau
  fpr: float  # fraction of this model's non-members with score > tau (the realised FPR)
  num_members: int
  num_nonmembers: int


def membership_inference(member_scores: Any, nonmember_scores: Any,
                         calibration_scores: Any, fpr: float = 0.01) -> MembershipInference:
  """Attack one model with a threshold calibrated elsewhere.

  Args:
    member_scores: [n1] the model's scores on its training examples.
    nonmember_scores: [n0] its scores on examples it never saw.
    calibration_scores: the *other* model's scores on its own non-members;
      only these set the threshold (see `calibrate_threshold`).
    fpr: the target false-positive rate of the calibration.
  """
  members = _scores(member_scores, "member_scores")
  nonmembers = _scores(nonmember_scores, "nonmember_scores")
  threshold = calibrate_threshold(calibration_scores, fpr)
  return MembershipInference(
      auc=roc_auc(members, nonmembers),
      auc_se=auc_standard_error(members, nonmembers),
      threshold=threshold,
      tpr=positive_rate(members, threshold),
      fpr=positive_rate(nonmembers, threshold),
      num_members=int(members.size),
      num_nonmembers=int(nonmembers.size))


def pair_membership_inference(scores_a_on_a: Any, scores_a_on_b: Any, scores_b_on_b: Any,
                              scores_b_on_a: Any,
                              fpr: float = 0.01) -> tuple[MembershipInference, MembershipInference]:
  """Attack both models of a disjoint pair, each with a threshold calibrated on the other.

  scores_x_on_y are model x's scores on block y's examples. A is attacked with
  members block A, non-members block B and the threshold from B's scores on
  block A (B's non-members); B the other way round.
  """
  attack_a = membership_inference(scores_a_on_a, scores_a_on_b, scores_b_on_a, fpr)
  attack_b = membership_inference(scores_b_on_b, scores_b_on_a, scores_a_on_b, fpr)
  return attack_a, attack_b


# ---------------------------------------------------------------------------
# Adapters: one model family's inputs, losses and divergences.


def stack_apply(network) -> Callable:
  """Return apply(params [M, ...], x_t [M, B, ...], t [M, B]) -> outputs [M, B, ...] in float32.

  Each model of the stack gets its own row of inputs; the network runs in
  evaluation mode (no dropout).
  """

  def apply_one(params, x_t, t):
    return network.apply({"params": params}, x_t, t, train=False).astype(jnp.float32)

  return jax.vmap(apply_one)


@dataclasses.dataclass(frozen=True, eq=False)
class SequenceAdapter:
  """x0-predicting networks on one-hot sequences (the tree data).

  Examples are integer tokens [L]; the per-example loss is the token-mean
  cross-entropy -(1/L) sum_i log p(x0_i | x_t), and the divergence the KL of
  the x0-predictions summed over positions.
  """

  apply_fn: Callable  # (params [M], x_t [M, B, L, q], t [M, B]) -> logits [M, B, L, q]
  schedule: diffusion.Schedule
  num_symbols: int
  example_ndim: int = 1  # trailing axes of one clean example: [L]
  matmul_precision: Optional[str] = seq_metrics.MATMUL_PRECISION

  def noise_shape(self, example_shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(example_shape) + (self.num_symbols,)

  def predict(self, params: Any, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    # x0: [M, B, L] int; t: [M, B]; noise: [M, B, L, q] -> log-probabilities [M, B, L, q]
    clean = jax.nn.one_hot(x0, self.num_symbols, dtype=jnp.float32)
    x_t = diffusion.forward_noise(self.schedule, clean, t, noise)
    return jax.nn.log_softmax(self.apply_fn(params, x_t, t), axis=-1)

  def example_loss(self, prediction: jax.Array, x0: jax.Array, noise: jax.Array) -> jax.Array:
    del noise  # the target is the clean sequence
    picked = jnp.take_along_axis(prediction, x0[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return -jnp.mean(picked, axis=-1)  # [M, B]

  def divergence(self, prediction_a: jax.Array, prediction_b: jax.Array) -> jax.Array:
    return seq_metrics.kl_divergence(prediction_a, prediction_b)  # [..., B]


@dataclasses.dataclass(frozen=True, eq=False)
class ImageAdapter:
  """eps-predicting networks on images, each model in its own centred coordinates.

  Model m gets x_t = sqrt(abar_t) (x0 - mu_m) + sqrt(1 - abar_t) eps for the
  same clean x0 and eps; predicted noises are coordinate-free and directly
  comparable. The per-example loss is mean over pixels of (eps_hat - eps)^2.
  """

  apply_fn: Callable  # (params [M], x_t [M, B, H, W, C], t [M, B]) -> eps_hat
  schedule: diffusion.Schedule
  centres: np.ndarray  # [M, H, W, C] centre mu_m of each model (a constant image for block centring)
  divergence_kind: str = "cosine"  # "cosine" (1 - raw cosine) or "mse"
  example_ndim: int = 3  # trailing axes of one clean example: [H, W, C]
  matmul_precision: Optional[str] = None  # keep the caller's precision

  def __post_init__(self):
    if self.divergence_kind not in IMAGE_DIVERGENCES:
      raise ValueError(f"divergence_kind={self.divergence_kind!r}; choose one of "
                       f"{IMAGE_DIVERGENCES}.")
    centres = np.asarray(self.centres, np.float32)
    if centres.ndim != 1 + self.example_ndim:
      raise ValueError(f"centres must have shape [M, H, W, C], got {centres.shape}.")
    object.__setattr__(self, "centres", centres)

  def noise_shape(self, example_shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(example_shape)

  def predict(self, params: Any, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    # x0, noise: [M, B, H, W, C]; t: [M, B] -> eps_hat [M, B, H, W, C]
    unit = (slice(None), slice(None)) + (None,) * self.example_ndim
    centres = jnp.asarray(self.centres)[:, None]
    x_t = (self.schedule.signal_scale(t)[unit] * (x0.astype(jnp.float32) - centres) +
           self.schedule.noise_scale(t)[unit] * noise)
    return self.apply_fn(params, x_t, t)

  def example_loss(self, prediction: jax.Array, x0: jax.Array, noise: jax.Array) -> jax.Array:
    del x0  # the target is the noise
    axes = tuple(range(-self.example_ndim, 0))
    return jnp.mean(jnp.square(prediction - noise), axis=axes)  # [M, B]

  def divergence(self, prediction_a: jax.Array, prediction_b: jax.Array) -> jax.Array:
    if self.divergence_kind == "cosine":
      return 1.0 - image_metrics.noise_cosine(prediction_a, prediction_b, self.example_ndim)
    axes = tuple(range(-self.example_ndim, 0))
    return jnp.mean(jnp.square(prediction_a - prediction_b), axis=axes)


# ---------------------------------------------------------------------------
# Fixed probe sets.


class ProbeSet(NamedTuple):
  """Noisy probe inputs: N examples, each with its time and noise (device arrays)."""
  x0: jax.Array  # [N, *example] clean examples (uncentred for images)
  t: jax.Array  # [N] int32 diffusion times
  noise: jax.Array  # [N, *noise] standard normal noise
  example: np.ndarray  # [N] row of the clean example within its source array (host)


class ProbeRequest(NamedTuple):
  """Clean examples of one input set and how to noise them (see `build_probe_sets`)."""
  examples: Any  # [N, *example]
  set_id: int  # probes.HELDOUT_SET or probes.training_set_id(block)
  t: Optional[int] = None  # fixed time; None draws one random time per example
  repeats: int = 1  # noisings per example at a fixed time


def build_probe_sets(adapter, seed: rng.KeyLike, requests: Sequence[ProbeRequest]) -> list:
  """Noise the examples of every request; returns one `ProbeSet` per request.

  Row i of a request is example i of its set. At a fixed t, input (i, r) gets
  eps from fold(seed, PROBE, set_id, i, t, r) for r = 0 ... repeats - 1, in
  example-major order. With t None, example i draws t_i uniformly from the
  schedule's times, from fold(seed, PROBE, set_id, i, TIME_DRAW, 1), and its
  noise from fold(seed, PROBE, set_id, i, t_i, 1). Every request is drawn in
  one device call, so a monitor compiles this once.
  """
  schedule = adapter.schedule
  parts = []
  for request in requests:
    examples = np.asarray(request.examples)
    if examples.ndim != 1 + adapter.example_ndim or examples.shape[0] < 1:
      raise ValueError(f"examples must have shape [N, *example] with {adapter.example_ndim} "
                       f"example axes and N >= 1, got {examples.shape}.")
    set_id = probes.check_nonnegative_int(request.set_id, "set_id")
    if request.t is None:
      rows = np.arange(examples.shape[0])
      repetition = np.full(rows.shape, LOSS_REPETITION)
      fixed_t = schedule.first_t  # unused: every example draws its own time
    else:
      fixed_t = probes.check_time(schedule, request.t)
      repeats = probes.check_positive_int(request.repeats, "repeats")
      rows = np.repeat(np.arange(examples.shape[0]), repeats)
      repetition = np.tile(np.arange(repeats), examples.shape[0])
    parts.append((examples, rows, set_id, repetition, fixed_t, request.t is None))
  if {p[0].shape[1:] for p in parts} != {parts[0][0].shape[1:]}:
    raise ValueError("Every probe request must have examples of the same shape.")

  column = lambda values, dtype=np.int32: np.concatenate(values).astype(dtype)
  times, noise = _draw_probes(
      rng.as_key(seed),
      jnp.asarray(column([np.full(p[1].shape, p[2]) for p in parts])),
      jnp.asarray(column([p[1] for p in parts])),
      jnp.asarray(column([p[3] for p in parts])),
      jnp.asarray(column([np.full(p[1].shape, p[4]) for p in parts])),
      jnp.asarray(column([np.full(p[1].shape, p[5]) for p in parts], bool)),
      noise_shape=adapter.noise_shape(parts[0][0].shape[1:]), first_t=schedule.first_t,
      last_t=schedule.last_t)
  sets, start = [], 0
  for examples, rows, *_ in parts:
    stop = start + rows.size
    sets.append(ProbeSet(jnp.asarray(examples[rows]), times[start:stop], noise[start:stop],
                         rows))
    start = stop
  return sets


@functools.partial(jax.jit, static_argnames=("noise_shape", "first_t", "last_t"))
def _draw_probes(key, set_ids, indices, repetitions, fixed_times, random_time, *, noise_shape,
                 first_t, last_t):
  # Per-row ids [N] -> times [N] and noise [N, *noise_shape].

  def draw(set_id, index, repetition, fixed_t, random):
    index = index[None]
    drawn = probes.probe_times(key, set_id, index, first_t, last_t, repetition)[0]
    t = jnp.where(random, drawn, fixed_t)
    return t, probes.probe_noise(key, set_id, index, t, repetition, noise_shape)[0]

  return jax.vmap(draw)(set_ids, indices, repetitions, fixed_times, random_time)


def build_probe_set(examples: Any, adapter, *, seed: rng.KeyLike, set_id: int,
                    t: Optional[int] = None, repeats: int = 1) -> ProbeSet:
  """Noise the examples of one set; see `build_probe_sets`."""
  return build_probe_sets(adapter, seed, [ProbeRequest(examples, set_id, t, repeats)])[0]


def concatenate_probe_sets(sets: Sequence[ProbeSet]) -> ProbeSet:
  """Join probe sets along the example axis (example rows stay per set)."""
  return ProbeSet(jnp.concatenate([s.x0 for s in sets]), jnp.concatenate([s.t for s in sets]),
                  jnp.concatenate([s.noise for s in sets]),
                  np.concatenate([s.example for s in sets]))


# ---------------------------------------------------------------------------
# The jitted measurement.


def _evaluate_shared(adapter, params, probe: tuple, pairs: np.ndarray, num_models: int,
                     batch_size: int) -> tuple[jax.Array, jax.Array]:
  """Run every model on shared inputs: pair divergences [P, N] and losses [M, N]."""

  def evaluate(batch):
    x0, t, noise = batch
    stacked = lambda x: jnp.broadcast_to(x, (num_models,) + x.shape)
    x0_m, noise_m = stacked(x0), stacked(noise)
    prediction = adapter.predict(params, x0_m, stacked(t), noise_m)  # [M, B, ...]
    loss = adapter.example_loss(prediction, x0_m, noise_m)
    if len(pairs):
      divergence = adapter.divergence(prediction[pairs[:, 0]], prediction[pairs[:, 1]])
    else:
      divergence = jnp.zeros((0, x0.shape[0]), jnp.float32)
    return divergence, loss

  return probes.map_in_batches(evaluate, probe, batch_size, out_axis=-1)


def _evaluate_own(adapter, params, probe: tuple, batch_size: int) -> jax.Array:
  """Run model m on row m of per-model inputs [M, N, ...]: losses [M, N]."""

  def evaluate(batch):
    x0, t, noise = (jnp.moveaxis(x, 0, 1) for x in batch)  # [M, B, ...]
    return adapter.example_loss(adapter.predict(params, x0, t, noise), x0, noise)

  per_example = tuple(jnp.moveaxis(x, 0, 1) for x in probe)  # [N, M, ...]
  return probes.map_in_batches(evaluate, per_example, batch_size, out_axis=-1)


class MonitorProbes(NamedTuple):
  """Every probe input of the monitor, as device arrays (a jit argument)."""
  split_heldout: tuple  # (x0, t, noise) of N_s R_s held-out inputs at t*
  split_train: Optional[tuple]  # the same for the training examples of every block, concatenated
  loss_heldout: tuple  # held-out examples at one random time each
  loss_own: tuple  # [M, N_l, ...] each model's own-block examples at random times
  mia: tuple  # the training examples of every block at t_mia, R_m repeats, concatenated


def make_measure(adapter, pairs: np.ndarray, num_models: int, batch_size: int) -> Callable:
  """Return measure(params [M, ...], probes: MonitorProbes) -> dict of device arrays.

  Outputs:
    split_heldout [P, N_s R_s]: pair divergences on held-out inputs at t*.
    split_heldout_loss [M, N_s R_s]: each model's loss on those inputs.
    split_train [P, K N_t R_s]: pair divergences on every block's training
      inputs at t*, absent when there are no training probes.
    loss_heldout, loss_own [M, N_l]: losses at random times on held-out and
      own-block examples.
    mia_loss [M, K N_m R_m]: losses at t_mia on every block's examples.
  """
  pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
  batch_size = probes.check_positive_int(batch_size, "batch_size")

  def measure(params, monitor_probes: MonitorProbes) -> dict:
    shared = functools.partial(_evaluate_shared, adapter, params, pairs=pairs,
                               num_models=num_models, batch_size=batch_size)
    out = {}
    out["split_heldout"], out["split_heldout_loss"] = shared(monitor_probes.split_heldout)
    if monitor_probes.split_train is not None:
      out["split_train"], _ = shared(monitor_probes.split_train)
    _, out["loss_heldout"] = shared(monitor_probes.loss_heldout)
    out["loss_own"] = _evaluate_own(adapter, params, monitor_probes.loss_own, batch_size)
    _, out["mia_loss"] = shared(monitor_probes.mia)
    return out

  jitted = jax.jit(measure)

  def run(params, monitor_probes: MonitorProbes) -> dict:
    if adapter.matmul_precision is None:
      return jitted(params, monitor_probes)
    with jax.default_matmul_precision(adapter.matmul_precision):
      return jitted(params, monitor_probes)

  return run


# ---------------------------------------------------------------------------
# Host summaries of one checkpoint.


@dataclasses.dataclass(frozen=True)
class Layout:
  """The disjoint pairs of a model list and the blocks its probe rows come from."""
  model_blocks: np.ndarray  # [M] data block of each model
  pairs: np.ndarray  # [P, 2] model indices (A, B) with block A < block B
  blocks: np.ndarray  # [K] the blocks of the models, sorted

  @property
  def block_index(self) -> np.ndarray:
    """[M] position of each model's block in `blocks`."""
    return np.searchsorted(self.blocks, self.model_blocks)


def make_layout(model_blocks: Sequence[int]) -> Layout:
  """List every pair of models on different blocks, lower block first, in model order."""
  blocks = np.asarray(model_blocks, np.int64)
  if blocks.ndim != 1 or blocks.size < 1:
    raise ValueError(f"model_blocks must list one block per model, got {model_blocks!r}.")
  pairs = [(a, b) for a in range(blocks.size) for b in range(blocks.size)
           if blocks[a] < blocks[b]]
  return Layout(blocks, np.asarray(pairs, np.int64).reshape(-1, 2), np.unique(blocks))


def _mean_over_pairs(values: np.ndarray, errors: np.ndarray, pairs: np.ndarray) -> tuple:
  """Return the mean of per-pair values and its SE.

  SE^2 = SE_jackknife^2 + mean_p(errors_p)^2: a leave-one-model-out jackknife
  for the spread between models, plus the probe-sampling SE of the pairs. All
  pairs share the probe inputs, so that part does not shrink with the number
  of pairs, and the mean of the pairs' SEs bounds it from above. One pair gives
  its own SE.
  """
  if values.size == 1:
    return float(values[0]), float(errors[0])
  result = stats.jackknife(values, pairs)
  probe_se = float(np.mean(errors))
  return float(result.estimate), float(np.sqrt(result.se**2 + probe_se**2))


def _per_example(values: np.ndarray, repeats: int) -> np.ndarray:
  """Average [..., N R] over the R repeats of each example: [..., N]."""
  return values.reshape(values.shape[:-1] + (-1, repeats)).mean(axis=-1)


def _se(values: np.ndarray) -> np.ndarray:
  """SE (ddof 1) over the last axis; NaN with one value."""
  if values.shape[-1] < 2:
    return np.full(values.shape[:-1], np.nan)
  return values.std(axis=-1, ddof=1) / np.sqrt(values.shape[-1])


def summarise(raw: dict, layout: Layout, *, split_repeats: int, mia_examples: int,
              mia_repeats: int, split_train_examples: int, fpr: float) -> dict:
  """Reduce the arrays of `make_measure` to the JSON record of one checkpoint.

  Per pair: divergence mean +- SE over held-out examples (repeats averaged
  first), the same on block A's and block B's training examples (their mean is
  `divergence_train`), and the membership attack in both directions. Per
  model: held-out (test) loss, own-block (train) loss and their gap. Across
  pairs: the mean, with the SE of `_mean_over_pairs`. Across models: the mean,
  with the SE over held-out examples of the model-averaged loss (the test
  loss), or the per-model SEs combined as sqrt(sum se_m^2) / M (train loss
  and gap).
  """
  raw = {name: np.asarray(value, np.float64) for name, value in raw.items()}
  pairs = layout.pairs
  num_models = layout.model_blocks.size
  block_index = layout.block_index
  record: dict[str, Any] = {}

  # Train/held-out loss gap.
  heldout = raw["loss_heldout"]  # [M, N_l]
  own = raw["loss_own"]
  gap_se = np.sqrt(_se(own)**2 + _se(heldout)**2)
  record["test_loss"] = float(heldout.mean())
  record["test_loss_se"] = float(_se(heldout.mean(axis=0)))
  record["train_loss"] = float(own.mean())
  record["train_loss_se"] = float(np.sqrt(np.sum(_se(own)**2)) / num_models)
  record["loss_gap"] = float(own.mean() - heldout.mean())
  record["loss_gap_se"] = float(np.sqrt(np.sum(gap_se**2)) / num_models)
  record["per_model"] = {
      "block": layout.model_blocks.tolist(),
      "test_loss": heldout.mean(axis=1).tolist(),
      "train_loss": own.mean(axis=1).tolist(),
      "loss_gap": (own.mean(axis=1) - heldout.mean(axis=1)).tolist(),
      "loss_gap_se": gap_se.tolist(),
      "split_time_loss": raw["split_heldout_loss"].mean(axis=1).tolist(),
  }
  if len(pairs) == 0:
    return record

  # Sample-split divergence on held-out and on training examples.
  divergence = _per_example(raw["split_heldout"], split_repeats)  # [P, N_s]
  per_pair = {"pairs": pairs.tolist(),
              "divergence": divergence.mean(axis=1).tolist(),
              "divergence_se": _se(divergence).tolist()}
  record["divergence"], record["divergence_se"] = _mean_over_pairs(
      divergence.mean(axis=1), _se(divergence), pairs)
  if "split_train" in raw:
    train = _per_example(raw["split_train"], split_repeats)  # [P, K N_t]
    train = train.reshape(len(pairs), layout.blocks.size, split_train_examples)
    rows = np.arange(len(pairs))
    on_a = train[rows, block_index[pairs[:, 0]]]  # [P, N_t]: seen by A, unseen by B
    on_b = train[rows, block_index[pairs[:, 1]]]
    both = np.concatenate([on_a, on_b], axis=1)
    per_pair["divergence_train_a"] = on_a.mean(axis=1).tolist()
    per_pair["divergence_train_b"] = on_b.mean(axis=1).tolist()
    record["divergence_train"], record["divergence_train_se"] = _mean_over_pairs(
        both.mean(axis=1), _se(both), pairs)

  # Membership inference: score = -loss at t_mia, repeats averaged.
  scores = -_per_example(raw["mia_loss"], mia_repeats)  # [M, K N_m]
  scores = scores.reshape(num_models, layout.blocks.size, mia_examples)
  attacks = []
  for a, b in pairs:
    ka, kb = block_index[a], block_index[b]
    attacks.append(pair_membership_inference(scores[a, ka], scores[a, kb], scores[b, kb],
                                             scores[b, ka], fpr))
  for field in MembershipInference._fields:
    per_pair[f"mia_{field}"] = [[getattr(attack, field) for attack in pair] for pair in attacks]
  auc = np.array([[attack.auc for attack in pair] for pair in attacks])  # [P, 2]
  auc_se = np.array([[attack.auc_se for attack in pair] for pair in attacks])
  # NOTE: both directions use the same examples, so combining their SEs as if
  # independent is an approximation.
  pair_auc_se = np.sqrt(np.sum(auc_se**2, axis=1)) / 2.0
  record["mia_auc"], record["mia_auc_se"] = _mean_over_pairs(auc.mean(axis=1), pair_auc_se, pairs)
  record["mia_tpr"] = float(np.mean(per_pair["mia_tpr"]))
  record["mia_fpr"] = float(np.mean(per_pair["mia_fpr"]))
  record["per_pair"] = per_pair
  return record


def forward_passes(num_models: int, num_blocks: int, *, split_heldout_examples: int,
                   split_train_examples: int, split_repeats: int, loss_examples: int,
                   mia_examples: int, mia_repeats: int) -> int:
  """Count the single-example network evaluations of one monitor call (all models).

  M (N_s R_s + K N_t R_s + N_l + K N_m R_m) + M N_l: every model runs on the
  shared sets and on its own loss examples.
  """
  shared = (split_heldout_examples * split_repeats +
            num_blocks * split_train_examples * split_repeats + loss_examples +
            num_blocks * mia_examples * mia_repeats)
  return int(num_models * (shared + loss_examples))
