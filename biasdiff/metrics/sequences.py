"""Bias measures of the tree-data setting, computed on device.

Every measure takes the model as a function, so a network, a stack of networks
and the exact denoisers are interchangeable:

- `log_prob_fn(x_t, t, *fn_args)` maps noisy one-hot sequences x_t [B, L, q]
  and integer times t [B] to log-probabilities of the clean symbol
  [..., B, L, q]. Leading axes (a vmapped stack of models, or the levels of
  BP_k) pass through every measure. Wrap a network's logits with
  `log_softmax_fn`; use `bp_log_prob_fn` for BP_0 and BP_k.
- `denoise(x_t, t, *denoise_args)` returns probabilities of the shape of x_t,
  as the ancestral sampler of `biasdiff.diffusion` expects (U-turns).

Functions are static jit arguments: reuse one function object, because a new
closure per call compiles again. Parameters go in fn_args, which are traced.

Conventions. KL is in nats. The KL between two [L, q] arrays of per-position
distributions is the sum over the L positions of
sum_a P[a] (log P[a] - log Q[a]), and terms with P[a] = 0 contribute 0. The
parity mode instead clips P and Q at 1e-8 without renormalising, as the
authors' code did. Model log-probabilities are log_softmax(logits) in fp32,
and the functions that compare distributions trace the model under
jax.default_matmul_precision("highest"), so float32 matmuls run at full
precision on accelerators. U-turns leave the caller's precision in place.
Probe noise is a pure function of (seed, set, index, t, repetition), see
`biasdiff.metrics.probes`, so every checkpoint and model gets the same inputs.
Every statistic comes with its sample count and standard error (ddof 1).
"""

import dataclasses
import functools
import logging
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from biasdiff import diffusion
from biasdiff import kernels
from biasdiff import rng
from biasdiff.hierarchical import bp
from biasdiff.hierarchical.grammar import Grammar
from biasdiff.hierarchical.parse import is_valid
from biasdiff.metrics import probes
from biasdiff.metrics import stats
from biasdiff.metrics.probes import RANDOM_SET
from biasdiff.metrics.stats import Summary

logger = logging.getLogger(__name__)

# Fractions of T of the fixed times: the sample-split KL uses floor(0.15 T)
# (75 at T = 500), the fixed-t loss decomposition floor(0.3 T) (150).
SPLIT_TIME_FRACTION = 0.15
LOSS_TIME_FRACTION = 0.3
# The parity mode of the KL and the NN-divergence floor both use this value.
PARITY_FLOOR = 1e-8
NN_HISTOGRAM_FLOOR = 1e-8
# Matmul precision under which distribution-comparing measures trace the model.
MATMUL_PRECISION = "highest"
# Added to the U-turn denoiser id before it is folded into the reverse-noise
# key, so that first folded id never equals one of the stream constants of
# biasdiff.rng (all below 100).
_DENOISER_ID_OFFSET = 1000

LogProbFn = Callable[..., jax.Array]


# ---------------------------------------------------------------------------
# KL divergence.


def kl_divergence(log_p: Any, log_q: Any, *, parity: bool = False) -> jax.Array:
  """Compute the per-sequence KL(P || Q) in nats, summed over positions and symbols.

  KL = sum_i sum_a P_ia (log P_ia - log Q_ia), with terms where P_ia = 0
  contributing 0 (so log_p may be -inf). In parity mode P and Q are first
  clipped elementwise to >= 1e-8, without renormalising.

  Args:
    log_p: log-probabilities [..., L, q].
    log_q: log-probabilities [..., L, q]; leading axes broadcast with log_p.
    parity: use the clipped formula of the authors' code.

  Returns:
    float32 [...] (the broadcast leading shape). Works under jit.

  Raises:
    ValueError: trailing shapes differ, or concrete inputs contain NaN or +inf.
  """
  log_p = jnp.asarray(log_p, jnp.float32)
  log_q = jnp.asarray(log_q, jnp.float32)
  if log_p.ndim < 2 or log_q.ndim < 2 or log_p.shape[-2:] != log_q.shape[-2:]:
    raise ValueError(
        f"log_p and log_q must both have shape [..., L, q] with the same L and q, got "
        f"{log_p.shape} and {log_q.shape}.")
  probes.check_log_probabilities(log_p, "log_p")
  probes.check_log_probabilities(log_q, "log_q")
  return _kl(log_p, log_q, parity)


def _kl(log_p: jax.Array, log_q: jax.Array, parity: bool) -> jax.Array:
  # [..., L, q] x [..., L, q] -> [...]
  if parity:
    p = jnp.maximum(jnp.exp(log_p), PARITY_FLOOR)
    q = jnp.maximum(jnp.exp(log_q), PARITY_FLOOR)
    terms = p * (jnp.log(p) - jnp.log(q))
  else:
    p = jnp.exp(log_p)
    # The where also discards the NaN of -inf - (-inf) where P = 0.
    terms = jnp.where(p > 0, p * (log_p - log_q), 0.0)
  return jnp.sum(terms, axis=(-2, -1))


def log_softmax_fn(logits_fn: Callable[..., jax.Array]) -> LogProbFn:
  """Wrap `logits_fn(x_t, t, *args) -> logits [..., B, L, q]` to return fp32 log-probabilities.

  The same wrapper object is returned for the same logits_fn, so jit caches
  are reused.
  """
  return _log_softmax_fn(logits_fn)


@functools.lru_cache(maxsize=None)
def _log_softmax_fn(logits_fn):

  def log_probs(x_t, t, *args):
    return jax.nn.log_softmax(logits_fn(x_t, t, *args).astype(jnp.float32), axis=-1)

  return log_probs


def bp_log_prob_fn(grammar: Grammar,
                   schedule: diffusion.Schedule,
                   filtered_levels: Union[int, Sequence[int]] = 0,
                   epsilon: float = bp.DEFAULT_EPSILON) -> LogProbFn:
  """Return log BP_k(x_t, t) as a log_prob_fn of (x_t [B, L, q], t [B]).

  With an int k it returns [B, L, q]; with a sequence of levels it returns
  the stack [K, B, L, q] in that order. abar_t is looked up per sequence in
  the schedule. The same object is returned for the same arguments.
  """
  if isinstance(filtered_levels, (int, np.integer)) and not isinstance(filtered_levels, bool):
    levels = int(filtered_levels)
  else:
    levels = tuple(int(k) for k in filtered_levels)
    if not levels:
      raise ValueError("filtered_levels must name at least one level k.")
  return _bp_log_prob_fn(grammar, schedule, levels, float(epsilon))


@functools.lru_cache(maxsize=None)
def _bp_log_prob_fn(grammar, schedule, levels, epsilon):

  def log_marginals(x_t, t, k):
    probabilities = bp.exact_denoiser(grammar, x_t, schedule.alpha_bar(t), k, epsilon)
    # At small t a marginal of order exp(-gamma) underflows to 0 in one BP variant
    # and not in another, which would make a KL between them infinite. Flooring at
    # the smallest normal float changes such a KL term by at most ~90 * p, with p
    # itself below 1e-30 there.
    return jnp.log(jnp.maximum(probabilities, jnp.finfo(probabilities.dtype).tiny))

  if isinstance(levels, int):
    return lambda x_t, t: log_marginals(x_t, t, levels)
  return lambda x_t, t: jnp.stack([log_marginals(x_t, t, k) for k in levels])


def _check_fn_output(log_probs: Any, num_inputs: int, name: str) -> None:
  if log_probs.ndim < 3 or log_probs.shape[-3] != num_inputs:
    raise ValueError(
        f"{name} returned shape {log_probs.shape}; expected [..., B, L, q] with the input "
        f"batch B = {num_inputs} on axis -3.")


# ---------------------------------------------------------------------------
# Probe packs and the sample-split divergences at a fixed time.


@dataclasses.dataclass(frozen=True, eq=False)
class ProbePack:
  """Fixed noisy inputs at one time: each clean sequence noised `repeats` times.

  Input s = i * repeats + r is sequence i with repetition r, noised with
  fold(seed, PROBE, set_id, indices[i], t, r). The pack is a pure function of
  its arguments and can be rebuilt instead of stored.
  """

  tokens: np.ndarray  # [S, L] int32 clean sequences
  indices: np.ndarray  # [S] index of each sequence within its set
  x_t: jax.Array  # [S * repeats, L, q] float32 noisy inputs
  t: int
  repeats: int
  set_id: int
  num_symbols: int

  @property
  def num_inputs(self) -> int:
    return int(self.x_t.shape[0])

  @property
  def sequence_of_input(self) -> np.ndarray:
    """[S * repeats] row of `tokens` behind each input."""
    return np.repeat(np.arange(self.tokens.shape[0]), self.repeats)


def build_probe_pack(tokens: Any, schedule: diffusion.Schedule, *, t: int, repeats: int,
                     seed: rng.KeyLike, set_id: int, num_symbols: int,
                     indices: Any = None) -> ProbePack:
  """Noise every clean sequence `repeats` times at time t.

  Args:
    tokens: clean sequences [S, L].
    schedule: the sequence schedule (1-based t).
    t: the diffusion time, e.g. `probes.time_at_fraction(SPLIT_TIME_FRACTION, T)`.
    repeats: independent noisings per sequence.
    seed: the analysis seed.
    set_id: the input set, probes.HELDOUT_SET or probes.training_set_id(block).
    num_symbols: q.
    indices: [S] index of each sequence within its set; default 0 ... S - 1.
  """
  tokens = probes.check_tokens(tokens, num_symbols)
  t = probes.check_time(schedule, t)
  repeats = probes.check_positive_int(repeats, "repeats")
  set_id = probes.check_nonnegative_int(set_id, "set_id")
  indices = probes.check_indices(indices, tokens.shape[0])
  x_t = _noisy_inputs(rng.as_key(seed), jnp.asarray(tokens), jnp.asarray(indices, jnp.int32),
                      jnp.int32(t), jnp.int32(set_id), schedule=schedule, repeats=repeats,
                      num_symbols=num_symbols)
  return ProbePack(tokens, indices, x_t, t, repeats, set_id, int(num_symbols))


@functools.partial(jax.jit, static_argnames=("schedule", "repeats", "num_symbols"))
def _noisy_inputs(key, tokens, indices, t, set_id, *, schedule, repeats, num_symbols):
  # [S, L] -> [S * repeats, L, q]
  clean = jnp.repeat(jax.nn.one_hot(tokens, num_symbols, dtype=jnp.float32), repeats, axis=0)
  input_indices = jnp.repeat(indices, repeats)
  repetitions = jnp.tile(jnp.arange(repeats, dtype=jnp.int32), tokens.shape[0])
  noise = probes.probe_noise(key, set_id, input_indices, t, repetitions, clean.shape[1:])
  times = jnp.full(clean.shape[0], t, jnp.int32)
  return diffusion.forward_noise(schedule, clean, times, noise)


def pack_log_probs(log_prob_fn: LogProbFn, pack: ProbePack, *, fn_args: tuple = (),
                   batch_size: int = 1024) -> jax.Array:
  """Evaluate log_prob_fn on every input of a pack, batch_size inputs at a time.

  Returns:
    [..., N, L, q] with N = pack.num_inputs and the function's leading axes.
  """
  batch_size = probes.check_positive_int(batch_size, "batch_size")
  with jax.default_matmul_precision(MATMUL_PRECISION):
    log_probs = _pack_log_probs(pack.x_t, jnp.int32(pack.t), tuple(fn_args), fn=log_prob_fn,
                                batch_size=batch_size)
  _check_fn_output(log_probs, pack.num_inputs, "log_prob_fn")
  probes.check_log_probabilities(log_probs, "log_prob_fn output")
  return log_probs


@functools.partial(jax.jit, static_argnames=("fn", "batch_size"))
def _pack_log_probs(x_t, t, fn_args, *, fn, batch_size):

  def evaluate(x):
    return fn(x, jnp.full(x.shape[0], t, jnp.int32), *fn_args)

  return probes.map_in_batches(evaluate, x_t, batch_size, out_axis=-3)


def pack_bp_log_marginals(grammar: Grammar, schedule: diffusion.Schedule, pack: ProbePack, *,
                          filtered_levels: Optional[Sequence[int]] = None,
                          batch_size: int = 4096) -> jax.Array:
  """Compute log BP_k on every input of a pack once, for caching: [K, N, L, q].

  filtered_levels defaults to 0 ... depth, so row k is BP_k.
  """
  depth = int(pack.tokens.shape[1]).bit_length() - 1
  levels = tuple(range(depth + 1)) if filtered_levels is None else tuple(filtered_levels)
  fn = bp_log_prob_fn(grammar, schedule, levels)
  return pack_log_probs(fn, pack, batch_size=batch_size)


def oracle_divergences(bp_log_marginals: Any, model_log_probs: Any, *,
                       parity: bool = False) -> jax.Array:
  """Compute KL(BP_k || model) per input from cached arrays.

  Args:
    bp_log_marginals: [K, N, L, q] from `pack_bp_log_marginals`.
    model_log_probs: [..., N, L, q] from `pack_log_probs`.

  Returns:
    [..., K, N]: entry k, s is KL(BP_k(x_s) || p_model(x_s)).
  """
  bp_log_marginals = jnp.asarray(bp_log_marginals)
  model_log_probs = jnp.asarray(model_log_probs)
  if bp_log_marginals.ndim != 4:
    raise ValueError(
        f"bp_log_marginals must have shape [K, N, L, q], got {bp_log_marginals.shape}.")
  if model_log_probs.shape[-3:] != bp_log_marginals.shape[1:]:
    raise ValueError(
        f"model_log_probs has trailing shape {model_log_probs.shape[-3:]}, expected "
        f"{bp_log_marginals.shape[1:]} (N, L, q) to match bp_log_marginals.")
  return kl_divergence(bp_log_marginals, model_log_probs[..., None, :, :, :], parity=parity)


class SplitDivergences(NamedTuple):
  """Per-input divergences of a model pair on one probe pack."""
  pair: jax.Array  # [..., N] KL(p_A || p_B)
  oracle_a: Optional[jax.Array]  # [..., K, N] KL(BP_k || p_A), row k of bp_log_marginals
  oracle_b: Optional[jax.Array]  # [..., K, N] KL(BP_k || p_B)

  def summaries(self) -> dict:
    """Mean and SE over the inputs (last axis) of each array."""
    return {name: stats.mean_and_se(value) for name, value in self._asdict().items()
            if value is not None}


def split_divergences(log_prob_fn: LogProbFn, args_a: tuple, args_b: tuple, pack: ProbePack, *,
                      bp_log_marginals: Any = None, log_prob_fn_b: Optional[LogProbFn] = None,
                      parity: bool = False, batch_size: int = 1024) -> SplitDivergences:
  """Compute the sample-split KL(p_A || p_B) and the oracle KLs KL(BP_k || p_A), KL(BP_k || p_B).

  Both models are evaluated batch by batch and the divergences are formed on
  the fly, so no predictions are stored. With p_A = log_prob_fn(x_s, t,
  *args_a) and p_B = log_prob_fn_b(x_s, t, *args_b) (log_prob_fn_b defaults to
  log_prob_fn), input s gives D_AB(s) = KL(p_A(s) || p_B(s)) and
  G_k(s) = KL(BP_k(s) || p(s)). For stacked models the leading axes of the
  two outputs broadcast.

  Args:
    bp_log_marginals: optional cached [K, N, L, q] from `pack_bp_log_marginals`.
  """
  batch_size = probes.check_positive_int(batch_size, "batch_size")
  fn_b = log_prob_fn if log_prob_fn_b is None else log_prob_fn_b
  bp_by_input = None
  if bp_log_marginals is not None:
    bp_log_marginals = jnp.asarray(bp_log_marginals, jnp.float32)
    expected = pack.x_t.shape
    if bp_log_marginals.ndim != 4 or bp_log_marginals.shape[1:] != expected:
      raise ValueError(
          f"bp_log_marginals must have shape [K, {', '.join(map(str, expected))}] to match the "
          f"pack, got {bp_log_marginals.shape}.")
    probes.check_log_probabilities(bp_log_marginals, "bp_log_marginals")
    bp_by_input = jnp.moveaxis(bp_log_marginals, 0, 1)  # [N, K, L, q]
  with jax.default_matmul_precision(MATMUL_PRECISION):
    pair, oracle_a, oracle_b = _split_divergences(
        pack.x_t, bp_by_input, jnp.int32(pack.t), tuple(args_a), tuple(args_b), fn_a=log_prob_fn,
        fn_b=fn_b, parity=parity, batch_size=batch_size)
  for name, value in (("pair", pair), ("oracle_a", oracle_a), ("oracle_b", oracle_b)):
    if value is not None:
      probes.check_finite(value, f"the {name} divergence (a model output is NaN or assigns "
                          "zero probability where the reference does not)")
  return SplitDivergences(pair, oracle_a, oracle_b)


@functools.partial(jax.jit, static_argnames=("fn_a", "fn_b", "parity", "batch_size"))
def _split_divergences(x_t, bp_by_input, t, args_a, args_b, *, fn_a, fn_b, parity, batch_size):

  def evaluate(batch):
    x, bp_batch = batch
    times = jnp.full(x.shape[0], t, jnp.int32)
    log_a = fn_a(x, times, *args_a)  # [..., B, L, q]
    log_b = fn_b(x, times, *args_b)
    pair = _kl(log_a, log_b, parity)  # [..., B]
    if bp_batch is None:
      return pair, None, None
    oracle = jnp.moveaxis(bp_batch, 0, 1)  # [K, B, L, q]
    oracle_a = _kl(oracle, log_a[..., None, :, :, :], parity)  # [..., K, B]
    oracle_b = _kl(oracle, log_b[..., None, :, :, :], parity)
    return pair, oracle_a, oracle_b

  return probes.map_in_batches(evaluate, (x_t, bp_by_input), batch_size, out_axis=-1)


# ---------------------------------------------------------------------------
# KL along diffusion time.


class TimeCurve(NamedTuple):
  """A per-time mean over inputs, with its SE (ddof 1) and input count."""
  times: np.ndarray  # [T] int
  mean: jax.Array  # [..., T]
  se: jax.Array  # [..., T]
  count: int  # inputs per time


def kl_along_time(reference_fn: LogProbFn, candidate_fn: LogProbFn, tokens: Any,
                  schedule: diffusion.Schedule, *, seed: rng.KeyLike, set_id: int, repeats: int,
                  num_symbols: int, indices: Any = None, times: Any = None,
                  reference_args: tuple = (), candidate_args: tuple = (), parity: bool = False,
                  batch_size: int = 2048, times_per_call: int = 50) -> TimeCurve:
  """Compute mean_s KL(reference(x_s^t) || candidate(x_s^t)) and its SE at every time t.

  At each t the inputs x_s^t (every sequence noised `repeats` times) are drawn
  afresh from fold(seed, PROBE, set_id, index, t, repetition). Different times
  therefore use independent noise, not trajectories, and at a given t the
  inputs equal those of a probe pack with the same seed, set and t. Noised
  inputs are formed batch by batch and never stored for all t. With
  reference_fn = bp_log_prob_fn(grammar, schedule, 0) and
  candidate_fn = bp_log_prob_fn(grammar, schedule, (1, ..., depth)) this is
  KL(BP_0 || BP_k)(t); with a model's log_prob_fn as candidate it is
  KL(BP_0 || model)(t).

  Args:
    times: [T] integer times; default every time of the schedule.
    times_per_call: times evaluated per device call; a host loop runs the calls
      and logs progress.

  Returns:
    TimeCurve with mean and SE over the S * repeats inputs, shape [..., T],
    where ... are the leading axes of the candidate's output.
  """
  tokens = probes.check_tokens(tokens, num_symbols)
  repeats = probes.check_positive_int(repeats, "repeats")
  set_id = probes.check_nonnegative_int(set_id, "set_id")
  batch_size = probes.check_positive_int(batch_size, "batch_size")
  times_per_call = probes.check_positive_int(times_per_call, "times_per_call")
  indices = probes.check_indices(indices, tokens.shape[0])
  times = schedule.times if times is None else np.asarray(times)
  if times.ndim != 1 or times.size < 1:
    raise ValueError(f"times must be a non-empty 1-D array, got shape {times.shape}.")
  for t in times:
    probes.check_time(schedule, int(t), "times entry")
  times = times.astype(np.int32)

  rows = np.repeat(np.arange(tokens.shape[0]), repeats)
  clean = jax.nn.one_hot(jnp.asarray(tokens[rows]), num_symbols, dtype=jnp.float32)
  input_indices = jnp.asarray(indices[rows], jnp.int32)
  repetitions = jnp.asarray(np.tile(np.arange(repeats), tokens.shape[0]), jnp.int32)
  key = rng.as_key(seed)

  call_size = min(times_per_call, times.size)
  means, ses = [], []
  for start in range(0, times.size, call_size):
    chunk = times[start:start + call_size]
    padded = np.concatenate([chunk, np.full(call_size - chunk.size, chunk[-1], np.int32)])
    with jax.default_matmul_precision(MATMUL_PRECISION):
      mean, se = _kl_curve_chunk(
          key, jnp.asarray(padded), clean, input_indices, repetitions, jnp.int32(set_id),
          tuple(reference_args), tuple(candidate_args), reference_fn=reference_fn,
          candidate_fn=candidate_fn, schedule=schedule, parity=parity, batch_size=batch_size)
    means.append(mean[:chunk.size])
    ses.append(se[:chunk.size])
    logger.info("KL along time: %d of %d times done.", start + chunk.size, times.size)
  mean = jnp.moveaxis(jnp.concatenate(means), 0, -1)
  se = jnp.moveaxis(jnp.concatenate(ses), 0, -1)
  probes.check_finite(mean, "the KL along time (a candidate assigns zero probability where "
                      "the reference does not, or returns NaN)")
  return TimeCurve(times, mean, se, int(rows.size))


@functools.partial(jax.jit, static_argnames=("reference_fn", "candidate_fn", "schedule", "parity",
                                             "batch_size"))
def _kl_curve_chunk(key, times, clean, input_indices, repetitions, set_id, reference_args,
                    candidate_args, *, reference_fn, candidate_fn, schedule, parity, batch_size):
  # times [C]; clean [N, L, q] -> (mean, se), each [C, ...]

  def at_time(t):

    def evaluate(batch):
      x0, index, repetition = batch
      noise = probes.probe_noise(key, set_id, index, t, repetition, x0.shape[1:])
      batch_times = jnp.full(x0.shape[0], t, jnp.int32)
      x_t = diffusion.forward_noise(schedule, x0, batch_times, noise)
      log_p = reference_fn(x_t, batch_times, *reference_args)
      log_q = candidate_fn(x_t, batch_times, *candidate_args)
      return _kl(log_p, log_q, parity)  # [..., B]

    values = probes.map_in_batches(evaluate, (clean, input_indices, repetitions), batch_size,
                                   out_axis=-1)
    count = values.shape[-1]
    se = jnp.std(values, axis=-1, ddof=1) / jnp.sqrt(count) if count > 1 else jnp.full(
        values.shape[:-1], jnp.nan)
    return jnp.mean(values, axis=-1), se

  return jax.lax.map(at_time, times)


# ---------------------------------------------------------------------------
# Nearest-neighbour divergence.


def nearest_distances(queries: Any, references: Any, num_symbols: int,
                      **kernel_options) -> np.ndarray:
  """Compute d(y) = min over references x of Hamming(y, x), int32 [Q].

  Uses the tiled exact search of `biasdiff.kernels`, which never forms the
  queries x references matrix. kernel_options go to `nearest_neighbors`.
  """
  queries = probes.check_tokens(queries, num_symbols, "queries")
  references = probes.check_tokens(references, num_symbols, "references")
  if queries.shape[1] != references.shape[1]:
    raise ValueError(
        f"queries have length {queries.shape[1]} but references have length "
        f"{references.shape[1]}; both must be sequences of the same length.")
  distances, _ = kernels.nearest_neighbors(queries, references, "hamming", k=1,
                                           num_classes=num_symbols, **kernel_options)
  return np.asarray(distances[:, 0])


def distance_histogram(distances: Any, length: int) -> np.ndarray:
  """Return the histogram P(d) over the integer bins d = 0 ... L: float64 [L + 1], summing to 1."""
  distances = np.asarray(distances)
  if not np.issubdtype(distances.dtype, np.integer):
    raise TypeError(f"distances must be integers, got dtype {distances.dtype}.")
  if distances.ndim != 1 or distances.size < 1:
    raise ValueError(f"distances must have shape [N] with N >= 1, got {distances.shape}.")
  if distances.min() < 0 or distances.max() > length:
    raise ValueError(
        f"distances lie in [{distances.min()}, {distances.max()}], outside [0, L = {length}].")
  return np.bincount(distances, minlength=length + 1) / distances.size


def histogram_kl(p_generated: Any, p_test: Any, floor: float = NN_HISTOGRAM_FLOOR) -> np.ndarray:
  """Compute sum_d P^_gen(d) log(P^_gen(d) / P^_test(d)), with P^ = max(P, floor) not renormalised.

  The floor sets the penalty for generated mass where the test histogram is
  empty. Histograms are [..., bins]; the result has the leading shape.
  """
  p_generated = np.maximum(np.asarray(p_generated, np.float64), floor)
  p_test = np.maximum(np.asarray(p_test, np.float64), floor)
  return np.sum(p_generated * np.log(p_generated / p_test), axis=-1)


class NNDivergence(NamedTuple):
  """Nearest-neighbour divergence of generated sequences to fresh ones."""
  divergence: float  # histogram_kl(generated_histogram, test_histogram)
  se: float  # bootstrap SE over generated and test samples; NaN without resamples
  generated_histogram: np.ndarray  # [L + 1]
  test_histogram: np.ndarray  # [L + 1]
  generated_distances: np.ndarray  # [G] int32
  fraction_exact: Summary  # generated sequences at distance 0
  fraction_invalid: Summary  # generated sequences without a parse
  num_generated: int
  num_test: int


def nn_divergence(generated: Any, training: Any, grammar: Grammar, *, test_distances: Any = None,
                  test_tokens: Any = None, seed: rng.KeyLike, num_resamples: int = 200,
                  floor: float = NN_HISTOGRAM_FLOOR, bootstrap_ids: Sequence[int] = (0, 0),
                  **kernel_options) -> NNDivergence:
  """Compare NN-Hamming-distance histograms of generated and fresh sequences.

  d(y) is the minimum Hamming distance of y to the training set. With P_gen
  and P_test the histograms of d over generated and fresh sequences on the
  bins 0 ... L, NN-div = sum_d P^_gen(d) log(P^_gen(d) / P^_test(d)), both
  floored at 1e-8 without renormalising. Also reported: the fraction of
  generated sequences at d = 0 and the fraction that do not parse, each with
  its SE (ddof 1 over sequences).

  Args:
    generated: [G, L] generated tokens.
    training: [n, L] the model's training block.
    grammar: for the parse and q.
    test_distances: [N] precomputed d of fresh sequences (they do not change
      across checkpoints); or give test_tokens [N, L].
    seed, bootstrap_ids: name the bootstrap resamples, from
      fold(seed, SUBSET, SUBSET_BOOTSTRAP, *bootstrap_ids) and the next id.
    num_resamples: bootstrap resamples for the SE; 0 skips it (SE is NaN).
  """
  q = grammar.num_symbols
  generated = probes.check_tokens(generated, q, "generated")
  length = generated.shape[1]
  if (test_distances is None) == (test_tokens is None):
    raise ValueError("Pass exactly one of test_distances (precomputed) and test_tokens.")
  if test_distances is None:
    test_distances = nearest_distances(test_tokens, training, q, **kernel_options)
  test_distances = np.asarray(test_distances)
  generated_distances = nearest_distances(generated, training, q, **kernel_options)
  p_generated = distance_histogram(generated_distances, length)
  p_test = distance_histogram(test_distances, length)
  divergence = float(histogram_kl(p_generated, p_test, floor))

  se = float("nan")
  if num_resamples:
    ids = tuple(int(i) for i in bootstrap_ids)
    generated_boot = _bootstrap_histograms(generated_distances, length, seed, num_resamples, ids)
    test_boot = _bootstrap_histograms(test_distances, length, seed, num_resamples,
                                      (ids[0], ids[1] + 1))
    se = float(np.std(histogram_kl(generated_boot, test_boot, floor), ddof=1))

  exact = stats.mean_and_se(jnp.asarray(generated_distances == 0, jnp.float32))
  invalid = stats.mean_and_se(jnp.asarray(~is_valid(grammar, generated), jnp.float32))
  return NNDivergence(divergence, se, p_generated, p_test, generated_distances, exact, invalid,
                      int(generated.shape[0]), int(test_distances.size))


def _bootstrap_histograms(distances: np.ndarray, length: int, seed: rng.KeyLike,
                          num_resamples: int, ids: tuple) -> np.ndarray:
  """[num_resamples, L + 1] histograms of bootstrap resamples of distances."""
  num_resamples = probes.check_positive_int(num_resamples, "num_resamples")
  if num_resamples < 2:
    raise ValueError(f"num_resamples must be 0 or >= 2, got {num_resamples}.")
  bins = length + 1
  histograms = []
  for indices in stats.resampled_indices(seed, distances.size, num_resamples, ids):
    resampled = distances[indices]  # [chunk, N]
    offsets = np.arange(indices.shape[0])[:, None] * bins
    counts = np.bincount((resampled + offsets).ravel(), minlength=indices.shape[0] * bins)
    histograms.append(counts.reshape(indices.shape[0], bins) / distances.size)
  return np.concatenate(histograms)


# ---------------------------------------------------------------------------
# Loss decomposition.


class LossProbes(NamedTuple):
  """Fixed noisy inputs for the loss decomposition: one (t, noise) per sequence."""
  tokens: np.ndarray  # [N, L] int32
  x_t: jax.Array  # [N, L, q] float32
  t: jax.Array  # [N] int32


def loss_probes(tokens: Any, schedule: diffusion.Schedule, *, seed: rng.KeyLike, set_id: int,
                num_symbols: int, t: Optional[int] = None, indices: Any = None,
                repetition: Optional[int] = None) -> LossProbes:
  """Noise each sequence once, at a fixed t or at its own random t.

  Fixed-t mode (t given): noise from fold(seed, PROBE, set, index, t, r) with
  r = 0 by default. Mean-t mode (t None): each sequence draws its time
  uniformly from the schedule's times, from
  fold(seed, PROBE, set, index, TIME_DRAW, r), then its noise at that time,
  with r = 1 by default, so the two modes never share noise.
  """
  tokens = probes.check_tokens(tokens, num_symbols)
  set_id = probes.check_nonnegative_int(set_id, "set_id")
  indices = probes.check_indices(indices, tokens.shape[0])
  if repetition is None:
    repetition = 1 if t is None else 0
  repetition = probes.check_nonnegative_int(repetition, "repetition")
  fixed_t = None if t is None else probes.check_time(schedule, t)
  x_t, times = _loss_probes(rng.as_key(seed), jnp.asarray(tokens), jnp.asarray(indices, jnp.int32),
                            jnp.int32(set_id), jnp.int32(repetition),
                            jnp.int32(0 if fixed_t is None else fixed_t),
                            schedule=schedule, num_symbols=num_symbols,
                            random_times=fixed_t is None)
  return LossProbes(tokens, x_t, times)


@functools.partial(jax.jit, static_argnames=("schedule", "num_symbols", "random_times"))
def _loss_probes(key, tokens, indices, set_id, repetition, fixed_t, *, schedule, num_symbols,
                 random_times):
  if random_times:
    times = probes.probe_times(key, set_id, indices, schedule.first_t, schedule.last_t, repetition)
  else:
    times = jnp.full(indices.shape, fixed_t, jnp.int32)
  clean = jax.nn.one_hot(tokens, num_symbols, dtype=jnp.float32)
  noise = probes.probe_noise(key, set_id, indices, times, repetition, clean.shape[1:])
  return diffusion.forward_noise(schedule, clean, times, noise), times


def loss_oracle(grammar: Grammar, schedule: diffusion.Schedule, loss_inputs: LossProbes, *,
                batch_size: int = 4096) -> jax.Array:
  """Compute the BP_0 marginals p* at the probes' (x_t, t), once per set and mode: [N, L, q]."""
  batch_size = probes.check_positive_int(batch_size, "batch_size")
  with jax.default_matmul_precision(MATMUL_PRECISION):
    return _loss_oracle(loss_inputs.x_t, loss_inputs.t, grammar=grammar, schedule=schedule,
                        batch_size=batch_size)


@functools.partial(jax.jit, static_argnames=("grammar", "schedule", "batch_size"))
def _loss_oracle(x_t, times, *, grammar, schedule, batch_size):

  def evaluate(batch):
    x, t = batch
    return bp.exact_denoiser(grammar, x, schedule.alpha_bar(t))

  return probes.map_in_batches(evaluate, (x_t, times), batch_size, out_axis=-3)


class LossDecomposition(NamedTuple):
  """Token-averaged losses L = L* + L~ with SE across sequences."""
  total: Summary  # L = -log p_theta[x0]
  distillation: Summary  # L* = -sum_a p*[a] log p_theta[a]
  excess: Summary  # L~ = L - L*
  per_sequence_total: jax.Array  # [..., N] means over the L tokens of each sequence
  per_sequence_distillation: jax.Array
  per_sequence_excess: jax.Array


def loss_decomposition(log_prob_fn: LogProbFn, loss_inputs: LossProbes, oracle: Any, *,
                       fn_args: tuple = (), batch_size: int = 1024) -> LossDecomposition:
  """Split the denoising cross-entropy into distillation and excess.

  Per token, with p_theta the model's distribution, p* the BP_0 marginal at
  the same (x_t, t) and x0 the one-hot clean token:
      L  = -sum_a x0[a] log p_theta[a],
      L* = -sum_a p*[a] log p_theta[a] = H(p*) + KL(p* || p_theta),
      L~ = L - L* = -sum_a (x0[a] - p*[a]) log p_theta[a],
  where terms with p*[a] = 0 contribute 0. Because E[x0 | x_t] = p*, a model
  that did not see x0 has E[L~] = 0; on its training data L~ goes negative
  when it favours the actual tokens more than the exact posterior does.

  Every sequence has L tokens, so the average over all tokens of the set is
  the mean of per-sequence token means. The SE is across sequences (ddof 1),
  because the tokens of one sequence share their noisy input.

  Args:
    loss_inputs: from `loss_probes`.
    oracle: p* [N, L, q], from `loss_oracle`.
  """
  batch_size = probes.check_positive_int(batch_size, "batch_size")
  oracle = jnp.asarray(oracle, jnp.float32)
  if oracle.shape != loss_inputs.x_t.shape:
    raise ValueError(
        f"oracle has shape {oracle.shape}, expected {loss_inputs.x_t.shape} to match the "
        "loss probes; build it with loss_oracle on the same probes.")
  probes.check_finite(oracle, "oracle")
  with jax.default_matmul_precision(MATMUL_PRECISION):
    totals, distillations = _loss_terms(
        loss_inputs.x_t, loss_inputs.t, jnp.asarray(loss_inputs.tokens), oracle, tuple(fn_args),
        fn=log_prob_fn, batch_size=batch_size)
  for name, value in (("L", totals), ("L*", distillations)):
    probes.check_finite(value, f"the per-sequence {name} (log_prob_fn assigns zero probability "
                        "to a clean token or to the support of p*)")
  excess = totals - distillations
  return LossDecomposition(stats.mean_and_se(totals), stats.mean_and_se(distillations),
                           stats.mean_and_se(excess), totals, distillations, excess)


@functools.partial(jax.jit, static_argnames=("fn", "batch_size"))
def _loss_terms(x_t, times, tokens, oracle, fn_args, *, fn, batch_size):

  def evaluate(batch):
    x, t, clean, p_star = batch
    log_p = fn(x, t, *fn_args).astype(jnp.float32)  # [..., B, L, q]
    total = -jnp.take_along_axis(
        log_p, jnp.broadcast_to(clean[..., None], log_p.shape[:-1] + (1,)), axis=-1)[..., 0]
    distillation = -jnp.sum(jnp.where(p_star > 0, p_star * log_p, 0.0), axis=-1)
    return jnp.mean(total, axis=-1), jnp.mean(distillation, axis=-1)  # [..., B]

  return probes.map_in_batches(evaluate, (x_t, times, tokens, oracle), batch_size, out_axis=-1)


# ---------------------------------------------------------------------------
# U-turns.


def uturn_starts(tokens: Any, schedule: diffusion.Schedule, *, t0: int, repetition: int,
                 seed: rng.KeyLike, set_id: int, num_symbols: int,
                 indices: Any = None) -> jax.Array:
  """Build the starts x_{t0} [N, L, q] with noise from fold(seed, START, t0, r, set, index)."""
  tokens = probes.check_tokens(tokens, num_symbols)
  t0 = probes.check_time(schedule, t0, "t0")
  repetition = probes.check_nonnegative_int(repetition, "repetition")
  set_id = probes.check_nonnegative_int(set_id, "set_id")
  indices = probes.check_indices(indices, tokens.shape[0])
  return _uturn_starts(rng.as_key(seed), jnp.asarray(tokens), jnp.asarray(indices, jnp.int32),
                       jnp.int32(t0), jnp.int32(repetition), jnp.int32(set_id),
                       schedule=schedule, num_symbols=num_symbols)


@functools.partial(jax.jit, static_argnames=("schedule", "num_symbols"))
def _uturn_starts(key, tokens, indices, t0, repetition, set_id, *, schedule, num_symbols):
  clean = jax.nn.one_hot(tokens, num_symbols, dtype=jnp.float32)
  noise = probes.start_noise(key, t0, repetition, set_id, indices, clean.shape[1:])
  return diffusion.forward_noise(schedule, clean, jnp.full(indices.shape, t0, jnp.int32), noise)


def uturn_overlaps(denoise: Callable[..., jax.Array], schedule: diffusion.Schedule, tokens: Any, *,
                   t0: int, num_repetitions: int, seed: rng.KeyLike, set_id: int,
                   denoiser_id: int, num_symbols: int, indices: Any = None,
                   denoise_args: tuple = (), shared_shape: Sequence[int] = (),
                   batch_size: int = 1024, first_repetition: int = 0) -> jax.Array:
  """Noise each sequence to t0, denoise back to t = 0, and score the overlap.

  overlap(y, y_hat) = (1/L) sum_i 1[y_hat_i = y_i], with y_hat the argmax of
  the sampler's output. Repetition r starts from `uturn_starts` (the same for
  every denoiser and checkpoint) and runs the x0-prediction sampler of
  `biasdiff.diffusion` with reverse noise from
  fold(seed, 1000 + denoiser_id, t0, r, set_id, SAMPLE_STEP, t, index).
  Different denoiser ids give independent reverse noise; give the network and
  BP the same id to share it.

  Args:
    denoise: x0-denoiser (x_t, t, *denoise_args) -> probabilities, e.g.
      `make_denoiser("bp", schedule.alpha_bar, grammar=g)` or a network's
      softmax; reuse one object across calls.
    shared_shape: leading axes of a model stack; every model gets the same
      starts and reverse noise.

  Returns:
    float32 [*shared_shape, num_repetitions, N].
  """
  tokens = probes.check_tokens(tokens, num_symbols)
  num_repetitions = probes.check_positive_int(num_repetitions, "num_repetitions")
  denoiser_id = probes.check_nonnegative_int(denoiser_id, "denoiser_id")
  first_repetition = probes.check_nonnegative_int(first_repetition, "first_repetition")
  indices = probes.check_indices(indices, tokens.shape[0])
  shared_shape = tuple(int(n) for n in shared_shape)
  event_shape = (tokens.shape[1], num_symbols)
  clean = jnp.asarray(tokens)
  overlaps = []
  for repetition in range(first_repetition, first_repetition + num_repetitions):
    starts = uturn_starts(tokens, schedule, t0=t0, repetition=repetition, seed=seed,
                          set_id=set_id, num_symbols=num_symbols, indices=indices)
    starts = jnp.broadcast_to(starts, shared_shape + starts.shape)
    x0 = diffusion.sample_in_batches(
        schedule, denoise, seed, indices.astype(np.int32), batch_size, x_start=starts,
        shared_shape=shared_shape, kind=diffusion.X0, event_shape=event_shape,
        denoise_args=tuple(denoise_args), t_start=t0,
        extra_ids=(_DENOISER_ID_OFFSET + denoiser_id, t0, repetition, set_id))
    overlaps.append(jnp.mean(diffusion.to_tokens(x0) == clean, axis=-1, dtype=jnp.float32))
  logger.debug("U-turns from t0=%d: %d repetitions of %d sequences.", t0, num_repetitions,
               tokens.shape[0])
  return jnp.stack(overlaps, axis=-2)


class UTurnRatio(NamedTuple):
  """Network-over-BP reconstruction ratio rho = m / b per sequence."""
  rho: np.ndarray  # [..., N], NaN for excluded sequences
  mean: np.ndarray  # [...] mean of rho over the included sequences
  se: np.ndarray  # [...] SEM (ddof 1) over them
  count: int  # included sequences (b > 0)
  num_excluded: int  # sequences with b = 0
  model_overlap: Summary  # mean over sequences of m, with SE
  bp_overlap: Summary  # mean over sequences of b, with SE


def uturn_ratio(model_overlaps: Any, bp_overlaps: Any) -> UTurnRatio:
  """Compute the per-sequence ratio of mean overlaps, network over BP.

  m = mean over repetitions of the network overlap, b = the same for BP, and
  rho = m / b. Sequences with b = 0 are excluded and counted. Reports mean
  rho +- SEM (ddof 1) over the included sequences, plus the mean overlaps.

  Args:
    model_overlaps: [..., R, N] from `uturn_overlaps`.
    bp_overlaps: [R', N] (R' may differ from R).
  """
  model_overlaps = np.asarray(model_overlaps, np.float64)
  bp_overlaps = np.asarray(bp_overlaps, np.float64)
  if model_overlaps.ndim < 2 or bp_overlaps.ndim != 2:
    raise ValueError(
        f"model_overlaps must be [..., R, N] and bp_overlaps [R, N], got {model_overlaps.shape} "
        f"and {bp_overlaps.shape}.")
  if model_overlaps.shape[-1] != bp_overlaps.shape[-1]:
    raise ValueError(
        f"model_overlaps has {model_overlaps.shape[-1]} sequences but bp_overlaps has "
        f"{bp_overlaps.shape[-1]}; both must score the same sequences.")
  for name, value in (("model_overlaps", model_overlaps), ("bp_overlaps", bp_overlaps)):
    if not np.all(np.isfinite(value)) or value.min() < 0 or value.max() > 1:
      raise ValueError(f"{name} must be finite overlaps in [0, 1].")
  m = model_overlaps.mean(axis=-2)  # [..., N]
  b = bp_overlaps.mean(axis=0)  # [N]
  included = b > 0
  count = int(included.sum())
  rho = np.where(included, m / np.where(included, b, 1.0), np.nan)
  if count == 0:
    raise ValueError("BP reconstructs no sequence at all (b = 0 everywhere); rho is undefined.")
  included_rho = rho[..., included]
  mean = included_rho.mean(axis=-1)
  if count > 1:
    se = included_rho.std(axis=-1, ddof=1) / np.sqrt(count)
  else:
    se = np.full(mean.shape, np.nan)
  return UTurnRatio(rho, mean, se, count, int(b.size - count), stats.mean_and_se(m),
                    stats.mean_and_se(b))


def overlap_summary(overlaps: Any) -> Summary:
  """Average over repetitions per sequence, then take mean +- SEM over sequences.

  [..., R, N] -> [...].
  """
  overlaps = jnp.asarray(overlaps, jnp.float32)
  if overlaps.ndim < 2:
    raise ValueError(f"overlaps must have shape [..., R, N], got {overlaps.shape}.")
  return stats.mean_and_se(jnp.mean(overlaps, axis=-2))


def random_sequences(seed: rng.KeyLike, num_sequences: int, length: int, num_symbols: int, *,
                     set_id: int = RANDOM_SET) -> np.ndarray:
  """Draw sequences of i.i.d. uniform tokens, int32 [N, L].

  Sequence i comes from fold(seed, SUBSET, SUBSET_RANDOM_TOKENS, set_id, i),
  so it is the same in every repetition and for every checkpoint.
  """
  num_sequences = probes.check_positive_int(num_sequences, "num_sequences")
  length = probes.check_positive_int(length, "length")
  num_symbols = probes.check_positive_int(num_symbols, "num_symbols")
  key = rng.as_key(seed)

  def draw(index):
    return jax.random.randint(
        probes.subset_key(key, probes.SUBSET_RANDOM_TOKENS, set_id, index), (length,), 0,
        num_symbols, jnp.int32)

  return np.asarray(jax.vmap(draw)(jnp.arange(num_sequences)))


def reference_subset(block_tokens: Any, size: int, *, seed: rng.KeyLike,
                     block: int) -> tuple[np.ndarray, np.ndarray]:
  """Draw `size` sequences of a block without replacement for the empirical denoiser.

  The draw comes from fold(seed, SUBSET, SUBSET_REFERENCES, block, 0).

  Returns:
    (rows [size] into block_tokens, tokens [size, L]).
  """
  block_tokens = np.asarray(block_tokens)
  size = probes.check_positive_int(size, "size")
  block = probes.check_nonnegative_int(block, "block")
  if block_tokens.ndim != 2 or size > block_tokens.shape[0]:
    raise ValueError(
        f"Cannot draw {size} sequences from a block of shape {block_tokens.shape}; "
        "lower size or pass the whole block [n, L].")
  key = probes.subset_key(seed, probes.SUBSET_REFERENCES, block, 0)
  rows = np.asarray(jax.random.choice(key, block_tokens.shape[0], (size,), replace=False))
  return rows, block_tokens[rows]
