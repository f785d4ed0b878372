"""The stored corpus: a training pool, a held-out pool, their metadata and hashes.

Layout of a corpus directory:
  train_pool.npy   uint8 [train_pool_size, L], stream 0 of the tree sampler
  heldout.npy      uint8 [heldout_size, L], stream 1
  metadata.json    grammar (tensor and pair lists), depth, seeds, sizes, the
                   generator version and the SHA-256 of each array

Arrays are plain `.npy` files read with `allow_pickle=False`, so opening a corpus
can never run code. Files are written to a temporary name and renamed into place.

Training block b of size n is rows [b*n, (b+1)*n) of the training pool: blocks of
one size are disjoint, and every "test" or "fresh" input of every analysis comes
from the held-out pool, which no model trains on. Disjointness is by index; the
pools are i.i.d. draws from a skewed distribution on a finite support, so contents
can coincide and are deliberately not deduplicated (fresh baselines must be i.i.d.).
`content_overlap` measures how often they do.
"""

import hashlib
import json
import logging
import os

import numpy as np

from biasdiff import io
from biasdiff.hierarchical.grammar import Grammar
from biasdiff.hierarchical.parse import is_valid
from biasdiff.hierarchical.sampler import GENERATOR_VERSION, sample_sequences

TRAIN_STREAM = 0
HELDOUT_STREAM = 1
_ARRAYS = {"train_pool": TRAIN_STREAM, "heldout": HELDOUT_STREAM}


def sha256(array: np.ndarray) -> str:
  """SHA-256 of an array's dtype, shape and C-order bytes."""
  digest = hashlib.sha256()
  digest.update(f"{array.dtype.str}{array.shape}".encode())
  digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


class Corpus:
  """Training and held-out pools of tree sequences with their provenance."""

  def __init__(self, train_pool: np.ndarray, heldout: np.ndarray, metadata: dict):
    self.train_pool = train_pool
    self.heldout_pool = heldout
    self.metadata = metadata

  @property
  def depth(self) -> int:
    return self.metadata["depth"]

  @property
  def fingerprint(self) -> dict:
    """What identifies the data: generation parameters and array hashes."""
    keys = ("num_symbols", "num_allowed", "sigma", "grammar_seed", "depth", "data_seed",
            "train_pool_size", "heldout_size", "generator_version", "sha256")
    return {k: self.metadata[k] for k in keys}

  def block_indices(self, block: int, size: int) -> np.ndarray:
    """Row indices [block*size, (block+1)*size) of the training pool."""
    if block < 0 or size < 1:
      raise ValueError(f"block must be >= 0 and size >= 1, got block {block}, size {size}")
    stop = (block + 1) * size
    if stop > len(self.train_pool):
      raise ValueError(
          f"training block {block} of size {size} needs {stop} pool rows, but the "
          f"training pool has {len(self.train_pool)}; build a larger corpus "
          f"(train_pool_size >= {stop}) or use fewer or smaller blocks")
    return np.arange(block * size, stop)

  def training_block(self, block: int, size: int) -> np.ndarray:
    """uint8 [size, L]: training block `block` of blocks of `size` sequences."""
    return self.train_pool[self.block_indices(block, size)]

  def heldout(self, start: int, stop: int) -> np.ndarray:
    """uint8 [stop - start, L]: rows [start, stop) of the held-out pool."""
    if not 0 <= start <= stop <= len(self.heldout_pool):
      raise ValueError(f"held-out rows [{start}, {stop}) are outside the held-out pool "
                       f"of {len(self.heldout_pool)} sequences; build a corpus with a "
                       f"larger heldout_size")
    return self.heldout_pool[start:stop]


def build_corpus(grammar: Grammar, depth: int, train_pool_size: int, heldout_size: int,
                 data_seed: int = 0) -> Corpus:
  """Draw both pools and describe them; deterministic in all arguments."""
  for name, value in (("train_pool_size", train_pool_size), ("heldout_size", heldout_size)):
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}")
  arrays = {
      name: sample_sequences(grammar, depth, size, data_seed, stream=stream)
      for (name, stream), size in zip(_ARRAYS.items(), (train_pool_size, heldout_size))
  }
  for name, array in arrays.items():
    valid = is_valid(grammar, array)
    if not valid.all():
      raise RuntimeError(f"{(~valid).sum()} sampled sequences of {name} do not parse; "
                         "the sampler or the grammar is broken")
  metadata = {
      **grammar.metadata(),
      "depth": depth,
      "sequence_length": 2**depth,
      "data_seed": data_seed,
      "train_pool_size": train_pool_size,
      "heldout_size": heldout_size,
      "streams": dict(_ARRAYS),
      "generator_version": GENERATOR_VERSION,
      "sha256": {name: sha256(array) for name, array in arrays.items()},
  }
  return Corpus(arrays["train_pool"], arrays["heldout"], metadata)


def save_corpus(corpus: Corpus, directory: str) -> None:
  """Write the corpus atomically (each file via a temporary name and a rename)."""
  os.makedirs(directory, exist_ok=True)
  for name, array in (("train_pool", corpus.train_pool), ("heldout", corpus.heldout_pool)):
    io.write_npy_atomically(os.path.join(directory, f"{name}.npy"), array)
  # The metadata goes last: a directory without it is an incomplete corpus.
  io.write_json_atomically(os.path.join(directory, "metadata.json"), corpus.metadata)


def load_corpus(directory: str, verify: bool = True) -> Corpus:
  """Read a corpus written by `save_corpus`, checking the stored hashes."""
  path = os.path.join(directory, "metadata.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no corpus at {directory!r}: {path} is missing; build one "
                            "with load_or_build_corpus")
  with open(path) as f:
    metadata = json.load(f)
  arrays = {}
  for name in _ARRAYS:
    array = np.load(os.path.join(directory, f"{name}.npy"), allow_pickle=False)
    if verify and sha256(array) != metadata["sha256"][name]:
      raise ValueError(f"{name}.npy in {directory!r} does not match the SHA-256 in its "
                       "metadata; the file is corrupt or was changed, so delete the "
                       "directory and rebuild the corpus")
    arrays[name] = array
  return Corpus(arrays["train_pool"], arrays["heldout"], metadata)


def load_or_build_corpus(directory: str, grammar: Grammar, depth: int,
                         train_pool_size: int, heldout_size: int,
                         data_seed: int = 0) -> Corpus:
  """Load the corpus stored in `directory`, or build and store it there.

  Raises:
    ValueError: if the directory contains a corpus with other parameters, which
      is never silently reused or overwritten.
  """
  requested = build_request(grammar, depth, train_pool_size, heldout_size, data_seed)
  if os.path.exists(os.path.join(directory, "metadata.json")):
    corpus = load_corpus(directory)
    stored = {k: corpus.metadata.get(k) for k in requested}
    if stored != requested:
      changed = sorted(k for k in requested if stored[k] != requested[k])
      raise ValueError(
          f"the corpus in {directory!r} was built with other parameters ({changed}); "
          "choose another directory or delete this one to rebuild")
    return corpus
  logging.info("Building corpus in %s: %d training and %d held-out sequences of length %d",
               directory, train_pool_size, heldout_size, 2**depth)
  corpus = build_corpus(grammar, depth, train_pool_size, heldout_size, data_seed)
  save_corpus(corpus, directory)
  return corpus


def build_request(grammar: Grammar, depth: int, train_pool_size: int, heldout_size: int,
                  data_seed: int) -> dict:
  """The metadata fields that must match for a stored corpus to be reused."""
  return {
      "rules": grammar.rules.tolist(),
      "depth": depth,
      "data_seed": data_seed,
      "train_pool_size": train_pool_size,
      "heldout_size": heldout_size,
      "generator_version": GENERATOR_VERSION,
  }


def verify_regeneration(corpus: Corpus, grammar: Grammar) -> None:
  """Regenerate both pools from the metadata and compare the hashes bit for bit."""
  meta = corpus.metadata
  fresh = build_corpus(grammar, meta["depth"], meta["train_pool_size"],
                       meta["heldout_size"], meta["data_seed"])
  if fresh.metadata["sha256"] != meta["sha256"]:
    raise ValueError("regenerating the corpus from its metadata gave different "
                     "sequences; the sampler changed without a new GENERATOR_VERSION")


def content_overlap(queries: np.ndarray, reference: np.ndarray) -> float:
  """Fraction of query sequences whose content occurs in the reference set."""
  if queries.shape[1:] != reference.shape[1:]:
    raise ValueError(f"sequence shapes differ: {queries.shape[1:]} vs {reference.shape[1:]}")
  row = np.dtype((np.void, queries.dtype.itemsize * queries.shape[1]))
  seen = np.ascontiguousarray(reference).view(row).ravel()
  asked = np.ascontiguousarray(queries).view(row).ravel()
  return float(np.isin(asked, seen).mean()) if len(asked) else 0.0
