"""Reference denoisers of the tree data, under one interface.

Each denoiser maps noisy one-hot sequences x_t [..., L, q] and the signal
coefficient abar_t (a scalar or one value per sequence) to per-position
probabilities of the clean symbol, [..., L, q]:

- exact BP (`exact_denoiser`, filtered_levels = 0): E[x0 | x_t] under the grammar;
- filtered BP_k (filtered_levels = k): the same under the k-filtered model;
- empirical: the posterior mean when the data distribution is the empirical
  distribution of a reference set, i.e. a perfectly memorising denoiser;
- prior: independent positions with a uniform symbol prior.

`make_denoiser` turns any of them into a function of (x_t, t) for a noise
schedule, which is what the ancestral sampler calls.
"""

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from biasdiff.hierarchical.bp import exact_denoiser, leaf_field
from biasdiff.hierarchical.grammar import Grammar

# x_t [..., L, q], abar_t [...] or scalar -> probabilities [..., L, q].
Denoiser = Callable[[jax.Array, jax.Array], jax.Array]


def empirical_denoiser(references: jax.Array, x_t: jax.Array, alpha_bar: jax.Array,
                       num_symbols: int) -> jax.Array:
  """Posterior mean when x0 is uniform over the reference sequences.

  With references x0^(p) (p = 1 ... P), the weights are

      w_p(x_t) = softmax_p( -||x_t - sqrt(abar) x0^(p)||^2 / (2 (1 - abar)) )
               = softmax_p( sum_i h_i[x0^(p)_i] ),   h = gamma x_t,

  since ||x0^(p)||^2 = L for every p, and the prediction is sum_p w_p x0^(p).

  Args:
    references: integer sequences [P, L].
    x_t: noisy one-hot sequences [..., L, q].
    alpha_bar: abar_t, scalar or broadcastable to the batch shape [...].
    num_symbols: q.

  Returns:
    float [..., L, q].
  """
  references = jnp.asarray(references)
  x_t = jnp.asarray(x_t)
  if references.ndim != 2 or references.shape[0] < 1:
    raise ValueError(f"references must have shape [P, L] with P >= 1, got {references.shape}")
  if not jnp.issubdtype(references.dtype, jnp.integer):
    raise TypeError(f"references must be integer tokens, got dtype {references.dtype}")
  if not isinstance(references, jax.core.Tracer) and (
      int(references.min()) < 0 or int(references.max()) >= num_symbols):
    raise ValueError(f"references must lie in [0, {num_symbols}), got values in "
                     f"[{int(references.min())}, {int(references.max())}]")
  if x_t.shape[-2:] != (references.shape[1], num_symbols):
    raise ValueError(f"x_t has trailing shape {x_t.shape[-2:]}, expected "
                     f"({references.shape[1]}, {num_symbols}) to match the references")
  one_hot = jax.nn.one_hot(references, num_symbols, dtype=jnp.float32)  # [P, L, q]
  flat = one_hot.reshape(one_hot.shape[0], -1)  # [P, L*q]
  field = leaf_field(x_t, alpha_bar)
  scores = field.reshape(*field.shape[:-2], -1) @ flat.T  # [..., P]
  weights = jax.nn.softmax(scores, axis=-1)
  return (weights @ flat).reshape(x_t.shape)


def prior_denoiser(x_t: jax.Array, alpha_bar: jax.Array) -> jax.Array:
  """Independent positions with a uniform prior: softmax(gamma x_t) per position."""
  return jax.nn.softmax(leaf_field(x_t, alpha_bar), axis=-1)


def make_denoiser(kind: str,
                  alpha_bar_fn: Callable[[jax.Array], jax.Array],
                  *,
                  grammar: Optional[Grammar] = None,
                  filtered_levels: int = 0,
                  references: Optional[jax.Array] = None) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Return a denoiser of (x_t [..., L, q], t [...]) for the ancestral sampler.

  Args:
    kind: "bp" (exact or filtered BP), "empirical" or "prior".
    alpha_bar_fn: maps integer times t to abar_t (a schedule's accessor).
    grammar: required for "bp"; gives q for "empirical".
    filtered_levels: k for "bp".
    references: integer sequences [P, L] for "empirical".
  """
  if kind == "bp":
    if grammar is None:
      raise ValueError("kind='bp' needs a grammar")
    base = functools.partial(exact_denoiser, grammar, filtered_levels=filtered_levels)
  elif kind == "empirical":
    if references is None or grammar is None:
      raise ValueError("kind='empirical' needs references [P, L] and the grammar (for q)")
    base = functools.partial(empirical_denoiser, references, num_symbols=grammar.num_symbols)
  elif kind == "prior":
    base = prior_denoiser
  else:
    raise ValueError(f"unknown denoiser kind {kind!r}; use 'bp', 'empirical' or 'prior'")

  def denoise(x_t, t):
    return base(x_t, alpha_bar_fn(t))

  return denoise
