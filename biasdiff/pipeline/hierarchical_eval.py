"""Measurements of a tree-data model zoo at one checkpoint, and the fixed inputs they use.

`build_context` draws every fixed input once (probe packs at t*, loss probes,
fresh-sequence NN distances) and caches the exact-BP references on disk.
`evaluate_checkpoint` then measures all models of the zoo at one checkpoint,
with the stacked parameters [models, ...] evaluated in one vmapped call:

- sample-split KL(p_A || p_B) at t* for every disjoint pair (blocks differ) and
  every same-data control (same block, two seeds), on held-out inputs and on
  A's training inputs;
- KL(BP_k || p_model) at t* for k = 0 ... depth, per model, on held-out inputs
  and on the model's own training inputs;
- the loss decomposition L = L* + L~ on the model's block and on held-out
  sequences, at the fixed time floor(0.3 T) and with one random t per sequence
  (the mean-t total is the train or test loss);
- for replicate-0 models: generation with shared noise and the nearest-neighbour
  divergence of the generated sequences to the model's block.
"""

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from biasdiff import diffusion
from biasdiff import hierarchical
from biasdiff.metrics import probes
from biasdiff.metrics import sequences as seq_metrics
from biasdiff.pipeline import stages
from biasdiff.training import state as state_lib

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ZooLayout:
  """The pairs, same-data controls and NN-divergence models of a zoo, by model index."""

  models: tuple  # ModelSpec of each stacked model, in training order
  pairs: np.ndarray  # [P, 2] model indices (A, B) with block A < block B
  controls: np.ndarray  # [C, 2] model indices with equal blocks, replicate 0 vs 1
  generators: np.ndarray  # [G] indices of replicate-0 models (one per block)

  @property
  def blocks(self) -> list:
    return sorted({m.block for m in self.models})

  def pair_blocks(self, pairs: np.ndarray) -> np.ndarray:
    """[P, 2] blocks of the two models of each pair."""
    blocks = np.array([m.block for m in self.models])
    return blocks[pairs] if len(pairs) else np.zeros((0, 2), dtype=int)


def zoo_layout(models) -> ZooLayout:
  """Build the pair lists of a zoo from its explicit model list (never from file order)."""
  models = tuple(models)
  pairs, controls = [], []
  for a, model_a in enumerate(models):
    for b, model_b in enumerate(models):
      if model_a.block < model_b.block:
        pairs.append((a, b))
      elif (model_a.block == model_b.block and model_a.replicate == 0 and
            model_b.replicate == 1):
        controls.append((a, b))
  generators = [i for i, m in enumerate(models) if m.replicate == 0]
  as_array = lambda x: np.asarray(x, dtype=np.int64).reshape(-1, 2)
  return ZooLayout(models, as_array(pairs), as_array(controls),
                   np.asarray(generators, dtype=np.int64))


@dataclasses.dataclass
class Context:
  """Everything a checkpoint evaluation needs besides the parameters."""

  analysis: Any
  grammar: hierarchical.Grammar
  schedule: diffusion.Schedule
  corpus: hierarchical.Corpus
  n: int
  layout: ZooLayout
  network: Any  # the transformer, float32
  test_pack: seq_metrics.ProbePack
  train_packs: dict  # block -> ProbePack
  bp_test: jax.Array  # [K, N, L, q] log BP_k on the test pack
  bp_train: dict  # block -> [K, N_b, L, q]
  loss_inputs: dict  # (set name, mode) -> LossProbes; set name "test" or "block<b>"
  loss_oracles: dict  # same keys -> [N, L, q] BP_0 marginals
  test_distances: dict  # block -> [N_nn] NN Hamming distance of fresh sequences
  log_prob_fn: Any
  denoise_fn: Any

  @property
  def length(self) -> int:
    return self.corpus.train_pool.shape[1]

  @property
  def num_symbols(self) -> int:
    return self.grammar.num_symbols


def network_functions(network):
  """Return (log_prob_fn, denoise_fn) of a model stack; params have a leading models axis.

  log_prob_fn(x_t [B, L, q], t [B], params) -> [models, B, L, q] log-probabilities;
  denoise_fn(x_t [models, B, L, q], t [models, B], params) -> probabilities.
  """

  def logits(params, x_t, t):
    return network.apply({"params": params}, x_t, t, train=False).astype(jnp.float32)

  def log_prob_fn(x_t, t, params):
    return jax.nn.log_softmax(jax.vmap(logits, in_axes=(0, None, None))(params, x_t, t), axis=-1)

  def denoise_fn(x_t, t, params):
    return jax.nn.softmax(jax.vmap(logits)(params, x_t, t), axis=-1)

  return log_prob_fn, denoise_fn


def build_context(analysis, grammar, schedule, corpus, n: int, models, network,
                  cache_dir: str) -> Context:
  """Draw the fixed inputs of every checkpoint and cache the exact-BP references."""
  layout = zoo_layout(models)
  cache = stages.ItemCache(cache_dir)
  q = grammar.num_symbols
  seed = analysis.seed
  t_star = probes.time_at_fraction(analysis.split_time_fraction, schedule.num_steps)
  t_loss = probes.time_at_fraction(analysis.loss_time_fraction, schedule.num_steps)

  test_tokens = corpus.heldout(0, analysis.split_test_sequences)
  test_pack = seq_metrics.build_probe_pack(
      test_tokens, schedule, t=t_star, repeats=analysis.split_repeats, seed=seed,
      set_id=probes.HELDOUT_SET, num_symbols=q)
  bp = lambda pack: {"log_bp": seq_metrics.pack_bp_log_marginals(
      grammar, schedule, pack, batch_size=analysis.eval_batch)}
  bp_test = cache.get_or_compute("bp_test", lambda: bp(test_pack))["log_bp"]
  train_packs, bp_train = {}, {}
  for block in layout.blocks:
    tokens = corpus.training_block(block, n)[:analysis.split_train_sequences]
    train_packs[block] = seq_metrics.build_probe_pack(
        tokens, schedule, t=t_star, repeats=analysis.split_repeats, seed=seed,
        set_id=probes.training_set_id(block), num_symbols=q)
    bp_train[block] = cache.get_or_compute(f"bp_block{block}",
                                           lambda p=train_packs[block]: bp(p))["log_bp"]

  loss_sets = {"test": (corpus.heldout(0, analysis.loss_test_sequences), probes.HELDOUT_SET)}
  for block in layout.blocks:
    loss_sets[f"block{block}"] = (corpus.training_block(block, n), probes.training_set_id(block))
  loss_inputs, loss_oracles = {}, {}
  for name, (tokens, set_id) in loss_sets.items():
    for mode, t in (("fixed", t_loss), ("mean", None)):
      inputs = seq_metrics.loss_probes(tokens, schedule, seed=seed, set_id=set_id,
                                       num_symbols=q, t=t)
      loss_inputs[name, mode] = inputs
      loss_oracles[name, mode] = cache.get_or_compute(
          f"oracle_{name}_{mode}",
          lambda i=inputs: {"p": seq_metrics.loss_oracle(grammar, schedule, i,
                                                        batch_size=analysis.eval_batch)})["p"]

  fresh = corpus.heldout(0, analysis.nn_test_sequences)
  test_distances = {}
  for block in layout.blocks:
    test_distances[block] = cache.get_or_compute(
        f"nn_test_block{block}",
        lambda b=block: {"d": seq_metrics.nearest_distances(
            fresh, corpus.training_block(b, n), q)})["d"]
  log_prob_fn, denoise_fn = network_functions(network)
  return Context(analysis, grammar, schedule, corpus, n, layout, network, test_pack,
                 train_packs, jnp.asarray(bp_test), {b: jnp.asarray(v) for b, v in bp_train.items()},
                 loss_inputs, loss_oracles, test_distances, log_prob_fn, denoise_fn)


def _pair_kl(log_probs: jax.Array, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and SE over inputs of KL(p_A || p_B) for model pairs of a stack [M, N, L, q]: [P] each."""
  if len(pairs) == 0:
    return np.zeros((0,)), np.zeros((0,))
  kl = seq_metrics.kl_divergence(log_probs[pairs[:, 0]], log_probs[pairs[:, 1]])  # [P, N]
  se = jnp.std(kl, axis=-1, ddof=1) / np.sqrt(kl.shape[-1])
  return np.asarray(jnp.mean(kl, axis=-1)), np.asarray(se)


def evaluate_checkpoint(ctx: Context, params: Any) -> dict:
  """Measure every model of the zoo at one checkpoint; returns named numpy arrays."""
  a = ctx.analysis
  layout = ctx.layout
  params = jax.tree.map(jnp.asarray, params)
  out = {}

  # Sample-split and oracle divergences at t*.
  test_log_probs = seq_metrics.pack_log_probs(ctx.log_prob_fn, ctx.test_pack, fn_args=(params,),
                                              batch_size=a.eval_batch)  # [M, N, L, q]
  oracle = seq_metrics.oracle_divergences(ctx.bp_test, test_log_probs)  # [M, K, N]
  out["oracle_test"] = np.asarray(oracle.mean(-1))
  out["oracle_test_se"] = np.asarray(oracle.std(-1, ddof=1) / np.sqrt(oracle.shape[-1]))
  out["pair_test"], out["pair_test_se"] = _pair_kl(test_log_probs, layout.pairs)
  out["control_test"], _ = _pair_kl(test_log_probs, layout.controls)

  num_models = len(layout.models)
  depth_plus_one = ctx.bp_test.shape[0]
  oracle_train = np.zeros((num_models, depth_plus_one))
  pair_train = np.zeros(len(layout.pairs))
  pair_train_se = np.zeros(len(layout.pairs))
  control_train = np.zeros(len(layout.controls))
  for block in layout.blocks:
    log_probs = seq_metrics.pack_log_probs(ctx.log_prob_fn, ctx.train_packs[block],
                                           fn_args=(params,), batch_size=a.eval_batch)
    members = [i for i, m in enumerate(layout.models) if m.block == block]
    kl = seq_metrics.oracle_divergences(ctx.bp_train[block], log_probs[np.asarray(members)])
    oracle_train[members] = np.asarray(kl.mean(-1))
    # The train panel of a pair uses A's training inputs, which B never saw.
    own = layout.pair_blocks(layout.pairs)[:, 0] == block
    pair_train[own], pair_train_se[own] = _pair_kl(log_probs, layout.pairs[own])
    own = layout.pair_blocks(layout.controls)[:, 0] == block
    control_train[own], _ = _pair_kl(log_probs, layout.controls[own])
  out["oracle_train"] = oracle_train
  out["pair_train"] = pair_train
  out["pair_train_se"] = pair_train_se
  out["control_train"] = control_train

  out.update(_losses(ctx, params))
  out.update(_generation(ctx, params))
  return out


def _losses(ctx: Context, params) -> dict:
  """Loss decomposition per model on its own block and on held-out sequences."""
  layout = ctx.layout
  num_models = len(layout.models)
  out = {}
  for mode in ("fixed", "mean"):
    for part in ("total", "distillation", "excess"):
      for where in ("train", "test"):
        out[f"loss_{mode}_{where}_{part}"] = np.zeros(num_models)
        out[f"loss_{mode}_{where}_{part}_se"] = np.zeros(num_models)
    groups = [("test", list(range(num_models)))]
    groups += [(f"block{b}", [i for i, m in enumerate(layout.models) if m.block == b])
               for b in layout.blocks]
    for name, members in groups:
      where = "test" if name == "test" else "train"
      subset = state_lib.select_models(params, members)
      result = seq_metrics.loss_decomposition(
          ctx.log_prob_fn, ctx.loss_inputs[name, mode], ctx.loss_oracles[name, mode],
          fn_args=(subset,), batch_size=ctx.analysis.eval_batch)
      for part in ("total", "distillation", "excess"):
        summary = getattr(result, part)
        out[f"loss_{mode}_{where}_{part}"][members] = np.asarray(summary.mean)
        out[f"loss_{mode}_{where}_{part}_se"][members] = np.asarray(summary.se)
  return out


def generate(ctx: Context, params, num_samples: int) -> np.ndarray:
  """Tokens [models, num_samples, L] generated with shared noise by a model stack."""
  num_models = jax.tree.leaves(params)[0].shape[0]
  x_0 = diffusion.sample_in_batches(
      ctx.schedule, ctx.denoise_fn, ctx.analysis.seed, num_samples,
      ctx.analysis.generation_batch, kind="x0", event_shape=(ctx.length, ctx.num_symbols),
      denoise_args=(params,), shared_shape=(num_models,))
  return np.asarray(diffusion.to_tokens(x_0))


def _generation(ctx: Context, params) -> dict:
  """Generate with the replicate-0 models and compare NN distances with fresh sequences."""
  layout = ctx.layout
  generators = layout.generators
  tokens = generate(ctx, state_lib.select_models(params, generators), ctx.analysis.num_generated)
  out = {name: [] for name in ("nn_divergence", "nn_divergence_se", "nn_generated_histogram",
                               "nn_test_histogram", "fraction_exact", "fraction_invalid")}
  for row, index in enumerate(generators):
    block = layout.models[index].block
    result = seq_metrics.nn_divergence(
        tokens[row], ctx.corpus.training_block(block, ctx.n), ctx.grammar,
        test_distances=ctx.test_distances[block], seed=ctx.analysis.seed,
        bootstrap_ids=(int(block), 0))
    out["nn_divergence"].append(result.divergence)
    out["nn_divergence_se"].append(result.se)
    out["nn_generated_histogram"].append(result.generated_histogram)
    out["nn_test_histogram"].append(result.test_histogram)
    out["fraction_exact"].append(float(result.fraction_exact.mean))
    out["fraction_invalid"].append(float(result.fraction_invalid.mean))
  out = {k: np.asarray(v) for k, v in out.items()}
  out["generated_example"] = tokens[:, :min(16, tokens.shape[1])]
  return out
