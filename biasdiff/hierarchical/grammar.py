"""Random tree grammars: the generative model of the hierarchical data.

A grammar over q symbols is a tensor M[a, b, c] = P(left = b, right = c | parent = a).
A sequence of length L = 2**depth is the leaf row of a full binary tree whose root
symbol is uniform and whose every node draws its ordered child pair from M.

The random grammar of the paper is built from (q, q_eff, sigma, seed):

1. list the q**2 ordered pairs (b, c) in lexicographic order, b major;
2. shuffle the list with numpy's legacy generator seeded with `seed`;
3. cut it into q chunks of q pairs; chunk a belongs to parent a;
4. the first q_eff pairs of chunk a are allowed for a, the rest of the chunk is
   forbidden for every parent (each pair lies in exactly one chunk);
5. each allowed (a, b, c) gets a logit sigma * N(0, 1), drawn parent by parent in
   chunk order from the same legacy stream;
6. M[a] is the softmax of the logits over the allowed pairs of a, and 0 elsewhere.

Allowed sets of different parents are disjoint, so an allowed child pair fixes its
parent: a valid sequence has exactly one parse tree.
"""

import dataclasses
from typing import Optional

import numpy as np

# Maximum deviation from 1 accepted for the row sums of a user-supplied grammar.
_NORMALISATION_TOLERANCE = 1e-6


@dataclasses.dataclass(frozen=True, eq=False)
class Grammar:
  """A tree grammar: the rule tensor and how it was made.

  Attributes:
    rules: float64 [q, q, q] array, rules[a, b, c] = P(left = b, right = c | a).
    num_allowed: allowed child pairs per parent (q_eff), or None for a grammar
      given as a tensor.
    sigma: standard deviation of the logits, or None.
    seed: seed of the legacy numpy generator that drew the grammar, or None.
  """

  rules: np.ndarray
  num_allowed: Optional[int] = None
  sigma: Optional[float] = None
  seed: Optional[int] = None

  def __post_init__(self):
    rules = np.asarray(self.rules, dtype=np.float64)
    _validate_rules(rules)
    rules.setflags(write=False)
    object.__setattr__(self, "rules", rules)

  @property
  def num_symbols(self) -> int:
    return self.rules.shape[0]

  @property
  def left_marginal(self) -> np.ndarray:
    """M_L[a, b] = sum_c M[a, b, c], the left-child channel, float64 [q, q]."""
    return self.rules.sum(axis=2)

  @property
  def right_marginal(self) -> np.ndarray:
    """M_R[a, c] = sum_b M[a, b, c], the right-child channel, float64 [q, q]."""
    return self.rules.sum(axis=1)

  def allowed_pairs(self, parent: int) -> list[tuple[int, int]]:
    """Child pairs (b, c) with M[parent, b, c] > 0, in lexicographic order."""
    b, c = np.nonzero(self.rules[parent])
    return [(int(i), int(j)) for i, j in zip(b, c)]

  def forbidden_pairs(self) -> list[tuple[int, int]]:
    """Child pairs that no parent can emit."""
    b, c = np.nonzero(self.rules.sum(axis=0) == 0)
    return [(int(i), int(j)) for i, j in zip(b, c)]

  def parent_table(self) -> np.ndarray:
    """Int array [q, q]: the unique parent of each child pair, -1 if forbidden.

    Raises:
      ValueError: if some pair has two possible parents, so parses are ambiguous.
    """
    emitting = self.rules > 0  # [parent, left, right]
    counts = emitting.sum(axis=0)
    if np.any(counts > 1):
      b, c = np.argwhere(counts > 1)[0]
      raise ValueError(
          f"child pair ({b}, {c}) has {counts[b, c]} possible parents, so "
          "sequences have no unique parse; exact parsing needs a grammar whose "
          "allowed pair sets are disjoint (as make_grammar builds them)")
    return np.where(counts == 1, emitting.argmax(axis=0), -1)

  def path_channel(self, depth: int, node: int) -> np.ndarray:
    """P[a, b] = P(node (depth, node) = b | root = a), float64 [q, q].

    The bits of `node`, most significant first, select the left (0) or right (1)
    child channel at each level: P = M_{bit_1} @ M_{bit_2} @ ... @ M_{bit_depth}.
    """
    if not 0 <= node < 2**depth:
      raise ValueError(f"node {node} does not exist at depth {depth}; "
                       f"use 0 <= node < {2**depth}")
    channel = np.eye(self.num_symbols)
    for level in range(depth):
      bit = (node >> (depth - 1 - level)) & 1
      channel = channel @ (self.right_marginal if bit else self.left_marginal)
    return channel

  def path_channels(self, depth: int) -> np.ndarray:
    """Return the channels of all 2**depth nodes at `depth`, float64 [2**depth, q, q]."""
    return np.stack([self.path_channel(depth, j) for j in range(2**depth)])

  def leaf_marginals(self, depth: int) -> np.ndarray:
    """Prior marginal of every leaf, float64 [2**depth, q]: uniform root pushed down."""
    uniform = np.full(self.num_symbols, 1.0 / self.num_symbols)
    return np.einsum("a,jab->jb", uniform, self.path_channels(depth))

  def metadata(self) -> dict:
    """JSON-ready description: parameters, the rule tensor and pair lists."""
    return {
        "num_symbols": self.num_symbols,
        "num_allowed": self.num_allowed,
        "sigma": self.sigma,
        "grammar_seed": self.seed,
        "rules": self.rules.tolist(),
        "allowed_pairs": [self.allowed_pairs(a) for a in range(self.num_symbols)],
        "forbidden_pairs": self.forbidden_pairs(),
    }


def _validate_rules(rules: np.ndarray) -> None:
  if rules.ndim != 3 or len(set(rules.shape)) != 1:
    raise ValueError(f"grammar rules must have shape [q, q, q], got {rules.shape}")
  if rules.shape[0] < 2:
    raise ValueError(f"a grammar needs at least 2 symbols, got q = {rules.shape[0]}")
  if not np.all(np.isfinite(rules)) or np.any(rules < 0):
    raise ValueError("grammar rules must be finite and non-negative")
  sums = rules.sum(axis=(1, 2))
  bad = np.flatnonzero(np.abs(sums - 1.0) > _NORMALISATION_TOLERANCE)
  if bad.size:
    a = int(bad[0])
    raise ValueError(
        f"grammar rules for parent {a} sum to {sums[a]:.9g}, not 1; normalise "
        "each M[a] over its q*q child pairs")


def make_grammar(num_symbols: int = 6,
                 num_allowed: int = 4,
                 sigma: float = 1.0,
                 seed: int = 0) -> Grammar:
  """Build the random grammar of (q, q_eff, sigma, seed) described in the module doc.

  numpy's legacy `RandomState(seed)` produces the same stream as the legacy global
  generator after `np.random.seed(seed)`, so seed 0 reproduces the paper's grammar
  bit for bit without touching numpy's global state.
  """
  q = _check_int("num_symbols", num_symbols, 2)
  q_eff = _check_int("num_allowed", num_allowed, 1)
  if q_eff > q:
    raise ValueError(f"num_allowed = {q_eff} exceeds num_symbols = {q}; each parent "
                     f"owns a chunk of q pairs, so use 1 <= num_allowed <= {q}")
  sigma = float(sigma)
  if not np.isfinite(sigma) or sigma < 0:
    raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
  seed = _check_int("seed", seed, 0)

  legacy = np.random.RandomState(seed)
  pairs = np.array([(b, c) for b in range(q) for c in range(q)], dtype=np.int64)
  legacy.shuffle(pairs)  # Shuffles rows in place.
  logits = np.full((q, q, q), -np.inf)
  for parent in range(q):
    for b, c in pairs[parent * q:parent * q + q_eff]:
      logits[parent, b, c] = sigma * legacy.randn()
  weights = np.exp(logits - logits.max(axis=(1, 2), keepdims=True))
  rules = weights / weights.sum(axis=(1, 2), keepdims=True)
  return Grammar(rules=rules, num_allowed=q_eff, sigma=sigma, seed=seed)


def paper_grammar() -> Grammar:
  """The paper's grammar: q = 6, q_eff = 4, sigma = 1, seed 0."""
  return make_grammar(num_symbols=6, num_allowed=4, sigma=1.0, seed=0)


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an integer, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return int(value)
