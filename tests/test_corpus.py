"""Tests of the stored corpus: determinism, hashes, blocks and held-out hygiene."""

import json
import os

import numpy as np
import pytest

from biasdiff import hierarchical as hier


@pytest.fixture(scope="module")
def grammar():
  return hier.paper_grammar()


def test_corpus_round_trip_and_reuse(tmp_path, grammar):
  built = hier.load_or_build_corpus(str(tmp_path), grammar, 3, 600, 200, data_seed=4)
  loaded = hier.load_or_build_corpus(str(tmp_path), grammar, 3, 600, 200, data_seed=4)
  np.testing.assert_array_equal(built.train_pool, loaded.train_pool)
  np.testing.assert_array_equal(built.heldout_pool, loaded.heldout_pool)
  assert loaded.fingerprint == built.fingerprint
  assert sorted(os.listdir(tmp_path)) == ["heldout.npy", "metadata.json", "train_pool.npy"]


def test_corpus_metadata_describes_generation(tmp_path, grammar):
  corpus = hier.build_corpus(grammar, 4, 100, 50, data_seed=2)
  meta = corpus.metadata
  assert (meta["num_symbols"], meta["num_allowed"], meta["sigma"]) == (6, 4, 1.0)
  assert (meta["grammar_seed"], meta["data_seed"], meta["depth"]) == (0, 2, 4)
  assert len(meta["forbidden_pairs"]) == 12
  np.testing.assert_array_equal(meta["rules"], grammar.rules)
  assert set(meta["sha256"]) == {"train_pool", "heldout"}


def test_corpus_regenerates_bit_for_bit(grammar):
  corpus = hier.build_corpus(grammar, 4, 1000, 300, data_seed=1)
  hier.verify_regeneration(corpus, grammar)
  np.testing.assert_array_equal(corpus.train_pool,
                                hier.sample_sequences(grammar, 4, 1000, 1, stream=0))
  np.testing.assert_array_equal(corpus.heldout_pool,
                                hier.sample_sequences(grammar, 4, 300, 1, stream=1))


def test_corpus_pools_are_valid_and_distinct_streams(grammar):
  corpus = hier.build_corpus(grammar, 4, 500, 500)
  assert hier.is_valid(grammar, corpus.train_pool).all()
  assert hier.is_valid(grammar, corpus.heldout_pool).all()
  assert not np.array_equal(corpus.train_pool, corpus.heldout_pool)


def test_corpus_detects_corrupt_file(tmp_path, grammar):
  hier.load_or_build_corpus(str(tmp_path), grammar, 3, 100, 50)
  pool = np.load(tmp_path / "train_pool.npy")
  pool[0, 0] = (pool[0, 0] + 1) % 6
  np.save(tmp_path / "train_pool.npy", pool)
  with pytest.raises(ValueError, match="does not match the SHA-256"):
    hier.load_corpus(str(tmp_path))


def test_corpus_with_other_parameters_is_not_reused(tmp_path, grammar):
  hier.load_or_build_corpus(str(tmp_path), grammar, 3, 100, 50, data_seed=0)
  with pytest.raises(ValueError, match=r"other parameters \(\['data_seed'\]\)"):
    hier.load_or_build_corpus(str(tmp_path), grammar, 3, 100, 50, data_seed=1)


def test_corpus_files_load_without_pickle(tmp_path, grammar):
  hier.load_or_build_corpus(str(tmp_path), grammar, 3, 100, 50)
  for name in ("train_pool.npy", "heldout.npy"):
    array = np.load(tmp_path / name, allow_pickle=False)
    assert array.dtype == np.uint8
  json.loads((tmp_path / "metadata.json").read_text())


def test_training_blocks_are_disjoint_index_ranges(grammar):
  corpus = hier.build_corpus(grammar, 3, 1000, 100)
  blocks = [corpus.block_indices(b, 250) for b in range(4)]
  assert len(np.unique(np.concatenate(blocks))) == 1000
  np.testing.assert_array_equal(corpus.training_block(2, 250), corpus.train_pool[500:750])
  with pytest.raises(ValueError, match="needs 1250 pool rows, but the training pool has 1000"):
    corpus.training_block(4, 250)
  with pytest.raises(ValueError, match=r"held-out rows \[0, 101\)"):
    corpus.heldout(0, 101)


def test_content_overlap_counts_repeated_sequences():
  reference = np.array([[0, 1], [2, 3], [4, 5]], dtype=np.uint8)
  queries = np.array([[0, 1], [1, 0], [4, 5], [4, 5]], dtype=np.uint8)
  assert hier.content_overlap(queries, reference) == 0.75
