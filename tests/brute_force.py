"""Brute-force references for the tree model, by enumerating every tree (float64 numpy)."""

import itertools
import string

import numpy as np


def leaf_joint(grammar, depth: int, filtered_levels: int = 0) -> np.ndarray:
  """P(x) of every leaf sequence, shape [q] * 2**depth, for the k-filtered model.

  Enumerates all assignments of the root and of every node at depths k ... depth-1
  and sums their probabilities; leaves are drawn from M given the depth-1 nodes.
  """
  q, rules, k = grammar.num_symbols, grammar.rules, filtered_levels
  length = 2**depth
  letters = string.ascii_letters
  if k == depth:  # Leaves are independent given the root, through their channels.
    channels = grammar.path_channels(depth)
    joint = np.zeros([q] * length)
    for root in range(q):
      factors = [channels[i, root] for i in range(length)]
      joint += np.einsum(",".join(letters[:length]) + "->" + letters[:length], *factors) / q
    return joint
  nodes = [(d, j) for d in range(k, depth) for j in range(2**d)]
  if k > 0:
    nodes = [(0, 0)] + nodes
  index = {node: i for i, node in enumerate(nodes)}
  assign = np.array(list(itertools.product(range(q), repeat=len(nodes))))
  weight = np.full(len(assign), 1.0 / q)
  if k > 0:
    channels = grammar.path_channels(k)
    for j in range(2**k):
      weight *= channels[j][assign[:, 0], assign[:, index[(k, j)]]]
  for d in range(k, depth - 1):
    for j in range(2**d):
      parent = assign[:, index[(d, j)]]
      weight *= rules[parent, assign[:, index[(d + 1, 2 * j)]],
                      assign[:, index[(d + 1, 2 * j + 1)]]]
  factors = [rules[assign[:, index[(depth - 1, j)]]] for j in range(length // 2)]
  subscripts = ",".join("z" + letters[2 * j] + letters[2 * j + 1] for j in range(length // 2))
  return np.einsum("z," + subscripts + "->" + letters[:length], weight, *factors)


def posterior_marginals(joint: np.ndarray, field: np.ndarray) -> np.ndarray:
  """Leaf posterior marginals [..., L, q] for leaf evidence exp(field [..., L, q])."""
  length = joint.ndim
  out = []
  for h in field.reshape(-1, *field.shape[-2:]):
    weighted = joint.copy()
    for i in range(length):
      shape = [1] * length
      shape[i] = -1
      weighted = weighted * np.exp(h[i] - h[i].max()).reshape(shape)
    weighted /= weighted.sum()
    out.append([weighted.sum(axis=tuple(a for a in range(length) if a != i))
                for i in range(length)])
  return np.array(out).reshape(field.shape)


def log_space_bp(rules: np.ndarray, field: np.ndarray, epsilon: float = 1e-16) -> np.ndarray:
  """Exact BP in float64 log space with logsumexp, for one field [L, q]."""
  from scipy.special import logsumexp
  q = rules.shape[0]
  log_rules = np.log(rules + epsilon)
  length = field.shape[0]
  depth = length.bit_length() - 1
  up = {depth: field - logsumexp(field, axis=-1, keepdims=True)}
  for d in range(depth - 1, -1, -1):
    left, right = up[d + 1][0::2], up[d + 1][1::2]
    msg = logsumexp(log_rules[None] + left[:, None, :, None] + right[:, None, None, :],
                    axis=(2, 3))
    up[d] = msg - logsumexp(msg, axis=-1, keepdims=True)
  context = np.full((1, q), -np.log(q))
  for d in range(depth):
    left, right = up[d + 1][0::2], up[d + 1][1::2]
    to_left = logsumexp(context[:, :, None, None] + log_rules[None] + right[:, None, None, :],
                        axis=(1, 3))
    to_right = logsumexp(context[:, :, None, None] + log_rules[None] + left[:, None, :, None],
                         axis=(1, 2))
    context = np.stack([to_left, to_right], axis=1).reshape(2**(d + 1), q)
    context -= logsumexp(context, axis=-1, keepdims=True)
  log_marg = up[depth] + context
  return np.exp(log_marg - logsumexp(log_marg, axis=-1, keepdims=True))
