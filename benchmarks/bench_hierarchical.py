"""Benchmarks of the tree data: exact BP throughput and the tree sampler.

BP is compared with a straightforward per-sequence numpy implementation of the
same recursion (one sequence at a time, node by node), measured in the same run.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from biasdiff import diffusion
from biasdiff import hierarchical as hier

NAME = "hierarchical"
TITLE = "Tree data: exact BP denoiser and tree sampler"


def numpy_bp_one_sequence(rules: np.ndarray, field: np.ndarray) -> np.ndarray:
  """Exact BP for one sequence [L, q], node by node: the baseline recursion."""
  q = rules.shape[0]
  flat_rules = rules.reshape(q, q * q)
  length = field.shape[0]
  depth = length.bit_length() - 1
  leaf = np.exp(field - field.max(axis=1, keepdims=True))
  up = {depth: [row / row.sum() for row in leaf]}
  for d in range(depth - 1, -1, -1):
    up[d] = []
    for j in range(2**d):
      message = flat_rules @ np.outer(up[d + 1][2 * j], up[d + 1][2 * j + 1]).ravel()
      up[d].append(message / message.sum())
  context = [np.full(q, 1.0 / q)]
  for d in range(depth):
    below = []
    for j in range(2**d):
      table = (context[j] @ flat_rules).reshape(q, q)
      to_left = table @ up[d + 1][2 * j + 1]
      to_right = up[d + 1][2 * j] @ table
      below += [to_left / to_left.sum(), to_right / to_right.sum()]
    context = below
  marginals = np.array(up[depth]) * np.array(context)
  return marginals / marginals.sum(axis=1, keepdims=True)


def _median_seconds(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times)), float(np.min(times)), float(np.max(times))


def run(device_mode: bool = False) -> dict:
  grammar = hier.paper_grammar()
  schedule = diffusion.sequence_schedule(500)
  batch = 100_000 if device_mode else 10_000
  t = 75
  alpha_bar = float(schedule.alpha_bars[t - 1])
  tokens = hier.sample_sequences(grammar, 4, batch, seed=0)
  noise = np.random.default_rng(0).standard_normal((batch, 16, 6)).astype(np.float32)
  x_t = jnp.asarray(np.sqrt(alpha_bar) * np.eye(6, dtype=np.float32)[tokens] +
                    np.sqrt(1 - alpha_bar) * noise)
  bp = jax.jit(lambda x: hier.exact_denoiser(grammar, x, alpha_bar))
  jax.block_until_ready(bp(x_t))
  bp_median, bp_min, bp_max = _median_seconds(lambda: bp(x_t), repeats=7)

  reference_count = 200
  rules = grammar.rules + hier.DEFAULT_EPSILON
  field = np.asarray(hier.leaf_field(x_t[:reference_count], alpha_bar), dtype=np.float64)
  start = time.perf_counter()
  reference = np.stack([numpy_bp_one_sequence(rules, f) for f in field])
  numpy_seconds = time.perf_counter() - start
  max_error = float(np.abs(reference - np.asarray(bp(x_t))[:reference_count]).max())

  sample_count = 1_000_000
  hier.sample_sequences(grammar, 4, 1000, seed=1)  # Compile the chunk program.
  sampler_median, sampler_min, sampler_max = _median_seconds(
      lambda: hier.sample_sequences(grammar, 4, sample_count, seed=1), repeats=3)

  # BP against one forward pass of the quick profile's network, both on depth-3 trees.
  from biasdiff.models import Transformer, init_params
  network = Transformer(6, 8, d_model=96, num_layers=3, num_heads=4, ffn_dim=192)
  params = init_params(network, jax.random.key(0), (1, 8, 6))
  short = x_t[:, :8]
  forward = jax.jit(lambda x: network.apply({"params": params}, x, jnp.full((x.shape[0],), t),
                                            train=False))
  bp_short = jax.jit(lambda x: hier.exact_denoiser(grammar, x, alpha_bar))
  jax.block_until_ready((forward(short), bp_short(short)))
  forward_median, _, _ = _median_seconds(lambda: forward(short), repeats=7)
  bp_short_median, _, _ = _median_seconds(lambda: bp_short(short), repeats=7)

  bp_rate = batch / bp_median
  numpy_rate = reference_count / numpy_seconds
  rows = [
      {"what": f"exact BP_0, B = {batch}, t = {t}, depth 4, q = 6",
       "sequences_per_s": bp_rate, "seconds_median": bp_median,
       "seconds_min": bp_min, "seconds_max": bp_max},
      {"what": "per-sequence numpy BP (same recursion)",
       "sequences_per_s": numpy_rate, "seconds_median": numpy_seconds,
       "max_abs_difference": max_error},
      {"what": f"exact BP_0, B = {batch}, depth 3 (8 tokens)",
       "sequences_per_s": batch / bp_short_median, "seconds_median": bp_short_median},
      {"what": f"quick-profile transformer forward pass, B = {batch}, 8 tokens",
       "sequences_per_s": batch / forward_median, "seconds_median": forward_median},
      {"what": f"tree sampler, {sample_count} sequences of depth 4",
       "sequences_per_s": sample_count / sampler_median, "seconds_median": sampler_median,
       "seconds_min": sampler_min, "seconds_max": sampler_max},
  ]
  goals = [
      {"goal": "exact BP >= 400,000 sequences/s (B = 10,000, 2-core CPU)",
       "value": bp_rate, "target": 4e5, "higher_is_better": True},
      {"goal": "exact BP >= 100x the per-sequence numpy recursion",
       "value": bp_rate / numpy_rate, "target": 100.0, "higher_is_better": True},
      {"goal": "exact BP cheaper per sequence than a forward pass of the quick network "
               "(ratio of times, depth 3)",
       "value": forward_median / bp_short_median, "target": 1.0, "higher_is_better": True},
  ]
  return {"rows": rows, "goals": goals}
