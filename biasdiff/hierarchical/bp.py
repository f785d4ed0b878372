"""Exact posterior mean of the tree model given Gaussian-noised leaves, by belief propagation.

Noising the one-hot sequence x0 as x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps makes
each leaf an independent observation with likelihood

    p(x_t^i | x0^i = e_a)  proportional to  exp(gamma_t * x_t^i[a]),
    gamma_t = sqrt(abar_t) / (1 - abar_t),

because ||e_a|| = 1. The posterior over clean sequences is the tree model with leaf
evidence h_i = gamma_t x_t^i, and E[x0 | x_t] is the vector of leaf posterior
marginals. On a tree, one upward and one downward sweep compute them exactly.

Messages are distributions over the q symbols, normalised after every level, and
the rule tensor is floored: M~ = M + epsilon (default 1e-16). The floor does not
change results on grammatical inputs, but on ungrammatical ones (random sequences
at small t) it decides the output and keeps every message strictly positive, so
the output is NaN-free for every finite input.

Upward (evidence) messages, leaves first:
    u_leaf_i = softmax(h_i)
    u_{d,j}(a) ~ sum_{b,c} M~[a,b,c] u_{d+1,2j}(b) u_{d+1,2j+1}(c)
Downward (context) messages, root first:
    v_{0,0}(a) = 1/q
    v_{d+1,2j}(b)   ~ sum_{a,c} v_{d,j}(a) M~[a,b,c] u_{d+1,2j+1}(c)
    v_{d+1,2j+1}(c) ~ sum_{a,b} v_{d,j}(a) M~[a,b,c] u_{d+1,2j}(b)
Leaf marginal: P(x0_i = a | x_t) ~ u_leaf_i(a) v_leaf_i(a).

Filtered BP_k (k = 1 ... depth) is exact inference in the k-filtered model, where
the 2**k depth-k nodes are drawn independently given the root through their path
channels P_j = M_{bit_1} ... M_{bit_k} (M_0 = M_L = sum_c M, M_1 = M_R = sum_b M),
and the tree branches with M below depth k. It keeps every single-node marginal
and the correlations inside depth-k subtrees, and drops those carried by the levels
above k. Its sweep: upward to depth k; channel messages
nu_j(a) ~ sum_b P~_j[a,b] u_{k,j}(b); cavities c_j(a) ~ prod_{i != j} nu_i(a),
formed from prefix and suffix sums of log nu (never by dividing out nu_j);
contexts v_{k,j}(b) ~ sum_a c_j(a) P~_j[a,b]; then the usual downward sweep.
BP_0 is the exact model.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from biasdiff.hierarchical.grammar import Grammar
from biasdiff.hierarchical.parse import check_length

DEFAULT_EPSILON = 1e-16

# Bound on |field| so that differences of fields stay finite in float32.
_FIELD_LIMIT = 1e37


def leaf_field(x_t: jax.Array, alpha_bar: jax.Array) -> jax.Array:
  """Leaf evidence h = gamma * x_t with gamma = sqrt(abar)/(1 - abar).

  Args:
    x_t: noisy one-hot sequences [..., L, q].
    alpha_bar: signal coefficient abar_t, a scalar or an array broadcastable to
      the batch shape [...].

  Returns:
    float [..., L, q], clipped to +-1e37 so that it stays finite.
  """
  x_t = jnp.asarray(x_t)
  if not jnp.issubdtype(x_t.dtype, jnp.floating):
    x_t = x_t.astype(jnp.float32)
  alpha_bar = jnp.asarray(alpha_bar, dtype=x_t.dtype)
  _check_alpha_bar(alpha_bar, x_t.shape[:-2])
  gamma = jnp.sqrt(alpha_bar) / (1.0 - alpha_bar)
  field = gamma[..., None, None] * x_t
  return jnp.clip(field, -_FIELD_LIMIT, _FIELD_LIMIT)


def exact_denoiser(grammar: Grammar,
                   x_t: jax.Array,
                   alpha_bar: jax.Array,
                   filtered_levels: int = 0,
                   epsilon: float = DEFAULT_EPSILON,
                   depth: Optional[int] = None) -> jax.Array:
  """E[x0 | x_t] under the tree model (BP_0) or the k-filtered model (BP_k).

  Args:
    grammar: the tree grammar.
    x_t: noisy one-hot sequences [..., L, q], L = 2**depth.
    alpha_bar: abar_t, a scalar or an array broadcastable to the batch shape.
    filtered_levels: k in 0 ... depth; 0 is exact BP.
    epsilon: floor added to M and to the path channels.
    depth: optional tree depth, checked against L.

  Returns:
    Leaf posterior marginals with the shape of x_t. Works under jit and vmap.
  """
  tree_depth = _check_evidence(grammar, x_t)
  if depth is not None:
    check_length(2**tree_depth, depth)
  field = leaf_field(x_t, alpha_bar)
  return posterior_marginals(grammar, field, filtered_levels, epsilon)


def posterior_marginals(grammar: Grammar,
                        field: jax.Array,
                        filtered_levels: int = 0,
                        epsilon: float = DEFAULT_EPSILON) -> jax.Array:
  """Leaf posterior marginals for leaf evidence exp(field), field [..., L, q]."""
  depth = _check_evidence(grammar, field)
  k = _check_filtered_levels(filtered_levels, depth)
  rules, channels = _floored_tables(grammar, depth, k, epsilon)
  field = jnp.asarray(field)
  if not jnp.issubdtype(field.dtype, jnp.floating):
    field = field.astype(jnp.float32)
  return _marginals(rules.astype(field.dtype), channels.astype(field.dtype), field,
                    depth=depth, filtered_levels=k)


def log_partition(grammar: Grammar,
                  field: jax.Array,
                  epsilon: float = DEFAULT_EPSILON) -> jax.Array:
  """log Z = log sum_x P(x) prod_i exp(field_i[x_i]) for field [..., L, q].

  On a tree this equals the Bethe free energy with the normalised messages. With
  one-hot evidence (field 0 on the observed symbol, -inf elsewhere) it is the
  exact log-probability of the sequence.
  """
  depth = _check_evidence(grammar, field)
  rules, _ = _floored_tables(grammar, depth, 0, epsilon)
  field = jnp.asarray(field)
  if not jnp.issubdtype(field.dtype, jnp.floating):
    field = field.astype(jnp.float32)
  return _log_partition(rules.astype(field.dtype), field, depth=depth)


def log_likelihood(grammar: Grammar,
                   tokens: jax.Array,
                   mask: Optional[jax.Array] = None,
                   epsilon: float = 0.0) -> jax.Array:
  """log P(observed tokens) under the grammar, summing over masked positions.

  Args:
    grammar: the tree grammar.
    tokens: integer sequences [..., L].
    mask: optional bool [..., L]; True marks an observed position. Masked
      positions get uniform evidence, so they are summed over.
    epsilon: floor on M; with the default 0 an ungrammatical sequence gets -inf.

  Returns:
    float [...] in nats. Divide by -log(q) for the reference's free energy F.
  """
  tokens = jnp.asarray(tokens)
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise TypeError(f"tokens must be integers, got dtype {tokens.dtype}")
  if tokens.ndim < 1:
    raise ValueError(f"tokens must have shape [..., L], got a scalar {tokens}")
  q = grammar.num_symbols
  if not isinstance(tokens, jax.core.Tracer) and tokens.size and (
      int(tokens.min()) < 0 or int(tokens.max()) >= q):
    raise ValueError(f"tokens must lie in [0, {q}), got values in "
                     f"[{int(tokens.min())}, {int(tokens.max())}]")
  field = jnp.where(jax.nn.one_hot(tokens, q, dtype=jnp.float32) > 0, 0.0, -jnp.inf)
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.dtype != bool:
      raise TypeError(f"mask must be boolean (True = observed), got dtype {mask.dtype}")
    if mask.shape != tokens.shape:
      raise ValueError(f"mask shape {mask.shape} must equal tokens shape {tokens.shape}")
    field = jnp.where(mask[..., None], field, 0.0)
  return log_partition(grammar, field, epsilon)


def _check_alpha_bar(alpha_bar: jax.Array, batch_shape: tuple) -> None:
  """Reject abar outside (0, 1) and shapes that would not broadcast to the batch."""
  try:
    broadcast = jnp.broadcast_shapes(alpha_bar.shape, batch_shape)
  except ValueError:
    broadcast = None
  if broadcast != tuple(batch_shape):
    raise ValueError(f"alpha_bar of shape {alpha_bar.shape} must be a scalar or broadcast to "
                     f"the batch shape {tuple(batch_shape)} of x_t (one value per sequence)")
  if isinstance(alpha_bar, jax.core.Tracer):
    return  # Values are unknown under jit; schedules only produce values in (0, 1).
  if alpha_bar.size and not bool(jnp.all((alpha_bar > 0) & (alpha_bar < 1))):
    raise ValueError(
        f"alpha_bar must lie in (0, 1), got values in [{float(alpha_bar.min())}, "
        f"{float(alpha_bar.max())}]; at abar = 1 the data is noiseless and the field "
        "sqrt(abar)/(1 - abar) is infinite (in float32, 1 - 1e-8 rounds to 1)")


def _check_evidence(grammar: Grammar, field) -> int:
  shape = jnp.shape(field)
  if len(shape) < 2:
    raise ValueError(f"x_t must have shape [..., L, q], got {shape}")
  if shape[-1] != grammar.num_symbols:
    raise ValueError(f"last axis of x_t has size {shape[-1]}, but the grammar has "
                     f"q = {grammar.num_symbols} symbols")
  return check_length(shape[-2])


def _check_filtered_levels(filtered_levels, depth: int) -> int:
  if (isinstance(filtered_levels, bool) or
      not isinstance(filtered_levels, (int, np.integer)) or
      not 0 <= filtered_levels <= depth):
    raise ValueError(f"filtered_levels must be an integer in [0, {depth}] for a "
                     f"depth-{depth} tree, got {filtered_levels!r}")
  return int(filtered_levels)


def _floored_tables(grammar: Grammar, depth: int, k: int, epsilon: float):
  if not np.isfinite(epsilon) or epsilon < 0:
    raise ValueError(f"epsilon must be finite and >= 0, got {epsilon}")
  q = grammar.num_symbols
  rules = grammar.rules.reshape(q, q * q) + epsilon
  if k == 0:
    channels = np.zeros((1, q, q))
  else:
    channels = grammar.path_channels(k) + epsilon
  return jnp.asarray(rules, jnp.float32), jnp.asarray(channels, jnp.float32)


def _normalise(message):
  return message / jnp.sum(message, axis=-1, keepdims=True)


def _upward(rules, leaf, depth, stop_depth):
  """Evidence messages u_d for d = depth ... stop_depth, each [..., 2**d, q]."""
  q = leaf.shape[-1]
  up = {depth: leaf}
  for d in range(depth - 1, stop_depth - 1, -1):
    children = up[d + 1].reshape(*leaf.shape[:-2], 2**d, 2, q)
    pairs = children[..., 0, :, None] * children[..., 1, None, :]  # [..., 2**d, q, q]
    parent = pairs.reshape(*pairs.shape[:-2], q * q) @ rules.T
    up[d] = _normalise(parent)
  return up


def _channel_context(channels, up_k):
  """Context messages v_k [..., 2**k, q] of the k-filtered model."""
  nu = _normalise(jnp.einsum("jab,...jb->...ja", channels, up_k))
  log_nu = jnp.log(nu)
  zeros = jnp.zeros_like(log_nu[..., :1, :])
  before = jnp.concatenate([zeros, jnp.cumsum(log_nu, axis=-2)[..., :-1, :]], axis=-2)
  after_reversed = jnp.cumsum(log_nu[..., ::-1, :], axis=-2)[..., :-1, :]
  after = jnp.concatenate([after_reversed[..., ::-1, :], zeros], axis=-2)
  cavity = jax.nn.softmax(before + after, axis=-1)
  return _normalise(jnp.einsum("...ja,jab->...jb", cavity, channels))


@functools.partial(jax.jit, static_argnames=("depth", "filtered_levels"))
def _marginals(rules, channels, field, *, depth, filtered_levels):
  q = field.shape[-1]
  batch = field.shape[:-2]
  leaf = jax.nn.softmax(field, axis=-1)
  up = _upward(rules, leaf, depth, filtered_levels)
  if filtered_levels == 0:
    context = jnp.full((*batch, 1, q), 1.0 / q, dtype=field.dtype)
  else:
    context = _channel_context(channels, up[filtered_levels])
  for d in range(filtered_levels, depth):
    table = (context @ rules).reshape(*batch, 2**d, q, q)  # [..., node, b, c]
    children = up[d + 1].reshape(*batch, 2**d, 2, q)
    to_left = jnp.einsum("...bc,...c->...b", table, children[..., 1, :])
    to_right = jnp.einsum("...bc,...b->...c", table, children[..., 0, :])
    context = _normalise(jnp.stack([to_left, to_right], axis=-2)).reshape(*batch, 2**(d + 1), q)
  return _normalise(leaf * context)


@functools.partial(jax.jit, static_argnames=("depth",))
def _log_partition(rules, field, *, depth):
  q = field.shape[-1]
  log_total = jnp.sum(jax.nn.logsumexp(field, axis=-1), axis=-1)
  message = jnp.exp(field - jnp.max(field, axis=-1, keepdims=True))
  message = message / jnp.sum(message, axis=-1, keepdims=True)
  for d in range(depth - 1, -1, -1):
    children = message.reshape(*field.shape[:-2], 2**d, 2, q)
    pairs = children[..., 0, :, None] * children[..., 1, None, :]
    parent = pairs.reshape(*pairs.shape[:-2], q * q) @ rules.T
    norm = jnp.sum(parent, axis=-1, keepdims=True)
    log_total = log_total + jnp.sum(jnp.log(norm[..., 0]), axis=-1)
    message = parent / jnp.where(norm > 0, norm, 1.0)
  return log_total + jnp.log(jnp.mean(message[..., 0, :], axis=-1))
