"""Build the tree corpus and check it and its exact denoisers end to end.

Usage:
  python experiments/check_hierarchical.py --workdir runs/check [--depth 4]

Writes `<workdir>/corpus/` (the stored pools) and `<workdir>/check.json` with what
was checked and measured: validity of every stored sequence, hash regeneration,
child-pair frequencies against M, BP at the first and last diffusion steps, and
the mean KL(BP_0 || BP_k) on held-out sequences at t = 0.15 T, which grows with k.
"""

import json
import logging
import os
import time

from absl import app
from absl import flags
import jax
import numpy as np

from biasdiff import diffusion
from biasdiff import hierarchical as hier

_WORKDIR = flags.DEFINE_string("workdir", "runs/check", "Output directory.")
_DEPTH = flags.DEFINE_integer("depth", 4, "Tree depth; sequences have 2**depth tokens.")
_TRAIN_POOL = flags.DEFINE_integer("train_pool_size", 70_000, "Training-pool sequences.")
_HELDOUT = flags.DEFINE_integer("heldout_size", 10_000, "Held-out sequences.")
_SCHEDULE = diffusion.sequence_schedule(500)
_NUM_STEPS = _SCHEDULE.num_steps


def alpha_bar(t: int) -> float:
  return float(_SCHEDULE.alpha_bars[t - 1])


def noisy(tokens: np.ndarray, t: int, seed: int) -> np.ndarray:
  one_hot = np.eye(6, dtype=np.float32)[tokens]
  noise = np.random.default_rng(seed).standard_normal(one_hot.shape).astype(np.float32)
  return np.sqrt(alpha_bar(t)) * one_hot + np.sqrt(1 - alpha_bar(t)) * noise


def kl_per_sequence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
  """sum over positions and symbols of p (log p - log q), with 0 log 0 = 0."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  terms = np.where(p > 0, p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300))), 0)
  return terms.sum(axis=(-2, -1))


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  grammar = hier.paper_grammar()
  depth = _DEPTH.value
  start = time.perf_counter()
  corpus = hier.load_or_build_corpus(os.path.join(_WORKDIR.value, "corpus"), grammar, depth,
                                     _TRAIN_POOL.value, _HELDOUT.value)
  hier.verify_regeneration(corpus, grammar)
  report = {"corpus": corpus.fingerprint, "seconds_to_build_and_verify": time.perf_counter() - start}
  report["all_sequences_valid"] = bool(hier.is_valid(grammar, corpus.train_pool).all() and
                                       hier.is_valid(grammar, corpus.heldout_pool).all())
  report["heldout_in_block0_of_12000"] = hier.content_overlap(
      corpus.heldout(0, min(1000, _HELDOUT.value)),
      corpus.train_pool[:min(12_000, _TRAIN_POOL.value)])

  probe = corpus.heldout(0, min(2000, _HELDOUT.value))
  one_hot = np.eye(6)[probe]
  at_first = hier.exact_denoiser(grammar, noisy(probe, 1, seed=1), alpha_bar(1))
  report["bp_max_error_at_t1"] = float(np.abs(np.asarray(at_first) - one_hot).max())
  at_last = hier.exact_denoiser(grammar, noisy(probe, _NUM_STEPS, seed=2), alpha_bar(_NUM_STEPS))
  report["bp_max_distance_to_prior_at_T"] = float(
      np.abs(np.asarray(at_last) - grammar.leaf_marginals(depth)).max())

  t_star = int(0.15 * _NUM_STEPS)
  x_t = noisy(probe, t_star, seed=3)
  exact = hier.exact_denoiser(grammar, x_t, alpha_bar(t_star))
  report["kl_bp0_bpk_at_t75"] = {}
  for k in range(1, depth + 1):
    kl = kl_per_sequence(exact, hier.exact_denoiser(grammar, x_t, alpha_bar(t_star), k))
    report["kl_bp0_bpk_at_t75"][k] = {"mean": float(kl.mean()),
                                      "sem": float(kl.std(ddof=1) / np.sqrt(len(kl))),
                                      "count": len(kl)}
  # Generation with the exact denoiser: every sample should parse.
  denoise = hier.make_denoiser("bp", _SCHEDULE.alpha_bar, grammar=grammar)
  start = time.perf_counter()
  x_0 = diffusion.sample(_SCHEDULE, denoise, seed=0, sample_ids=np.arange(1000), kind="x0",
                         event_shape=(2**depth, 6))
  generated = np.asarray(x_0.argmax(-1))
  report["bp_generation"] = {"count": 1000, "steps": _NUM_STEPS,
                             "seconds": time.perf_counter() - start,
                             "fraction_valid": float(hier.is_valid(grammar, generated).mean())}
  report["jax_devices"] = [str(d) for d in jax.devices()]
  path = os.path.join(_WORKDIR.value, "check.json")
  with open(path, "w") as f:
    json.dump(report, f, indent=1)
  logging.info("Wrote %s:\n%s", path, json.dumps(report, indent=1))


if __name__ == "__main__":
  app.run(main)
