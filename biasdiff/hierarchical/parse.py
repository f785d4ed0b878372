"""Bottom-up parsing of sequences: validity and exact log-probability.

Because an allowed child pair determines its parent, a valid sequence has exactly
one parse tree, which we recover level by level: adjacent pairs at depth d map to
their parents at depth d - 1. A sequence is valid iff every pair at every level is
allowed, and then

    log P(x) = -log q + sum over internal nodes of log M[parent, left, right].
"""

import numpy as np

from biasdiff.hierarchical.grammar import Grammar


def parse(grammar: Grammar, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Parse sequences bottom-up.

  Args:
    grammar: a grammar whose allowed pair sets are disjoint.
    tokens: integer array [..., L] with L a power of two.

  Returns:
    (valid, log_prob): bool [...] and float64 [...]; log_prob is -inf for
    invalid sequences.
  """
  tokens = check_tokens(grammar, tokens)
  parents = grammar.parent_table()
  with np.errstate(divide="ignore"):
    log_rules = np.log(grammar.rules)
  level = tokens.astype(np.int64)
  valid = np.ones(tokens.shape[:-1], dtype=bool)
  log_prob = np.zeros(tokens.shape[:-1])
  while level.shape[-1] > 1:
    left, right = level[..., 0::2], level[..., 1::2]
    up = parents[left, right]
    valid &= np.all(up >= 0, axis=-1)
    safe_up = np.maximum(up, 0)
    log_prob += np.where(up >= 0, log_rules[safe_up, left, right], 0.0).sum(axis=-1)
    level = safe_up
  log_prob = np.where(valid, log_prob - np.log(grammar.num_symbols), -np.inf)
  return valid, log_prob


def is_valid(grammar: Grammar, tokens: np.ndarray) -> np.ndarray:
  """Bool [...]: whether each sequence of `tokens` [..., L] has a parse tree."""
  return parse(grammar, tokens)[0]


def check_tokens(grammar: Grammar, tokens) -> np.ndarray:
  """Validate an integer token array [..., L] against the grammar's alphabet."""
  tokens = np.asarray(tokens)
  if not np.issubdtype(tokens.dtype, np.integer):
    raise TypeError(f"tokens must be integers, got dtype {tokens.dtype}")
  if tokens.ndim < 1:
    raise ValueError("tokens must have shape [..., L], got a scalar")
  check_length(tokens.shape[-1])
  if tokens.size and (tokens.min() < 0 or tokens.max() >= grammar.num_symbols):
    raise ValueError(f"tokens must lie in [0, {grammar.num_symbols}), got values in "
                     f"[{tokens.min()}, {tokens.max()}]")
  return tokens


def check_length(length: int, depth=None) -> int:
  """Return the tree depth for a sequence length, checking that they agree."""
  if length < 2 or length & (length - 1):
    raise ValueError(f"sequence length must be a power of two >= 2, got {length}")
  implied = length.bit_length() - 1
  if depth is not None and depth != implied:
    raise ValueError(f"depth {depth} does not match sequence length {length}; "
                     f"a depth-{depth} tree has {2**depth} leaves")
  return implied
