"""Tests for the tiled nearest-neighbour kernels against numpy brute force."""

import functools
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biasdiff.kernels import nearest_neighbors

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def brute_force_hamming(queries, references, k):
  distances = (queries[:, None, :] != references[None, :, :]).sum(-1)
  order = np.argsort(distances, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(distances, order, axis=1), order


def brute_force_sqeuclidean(queries, references, k):
  queries = queries.reshape(len(queries), -1).astype(np.float64)
  references = references.reshape(len(references), -1).astype(np.float64)
  distances = ((queries[:, None, :] - references[None, :, :]) ** 2).sum(-1)
  order = np.argsort(distances, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(distances, order, axis=1), order


def standardize_float64(x):
  x = x.reshape(len(x), -1).astype(np.float64)
  centred = x - x.mean(axis=1, keepdims=True)
  scaled = centred / (x.std(axis=1, ddof=1, keepdims=True) + 1e-12)
  return scaled / np.linalg.norm(scaled, axis=1, keepdims=True)


def brute_force_cosine(queries, references, k):
  distances = 1.0 - standardize_float64(queries) @ standardize_float64(
      references).T
  # Identical rows are exactly 0 by definition; float64 rounding would leave
  # about 1e-16 here and break the index order of exact ties.
  identical = (queries.reshape(len(queries), 1, -1)
               == references.reshape(1, len(references), -1)).all(-1)
  distances = np.where(identical, 0.0, distances)
  order = np.argsort(distances, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(distances, order, axis=1), order


def token_data(seed, num_queries=37, num_references=53, length=8,
               num_classes=3):
  """Random tokens with short sequences (many ties) and planted duplicates."""
  rng = np.random.default_rng(seed)
  queries = rng.integers(0, num_classes, (num_queries, length))
  references = rng.integers(0, num_classes, (num_references, length))
  references[7] = queries[0]  # exact duplicate, d = 0
  references[40] = queries[0]  # second exact duplicate: tie at d = 0
  references[12] = queries[1]
  references[12, 0] = (queries[1, 0] + 1) % num_classes  # d = 1
  return queries, references


def float_data(seed, num_queries=37, num_references=53, features=(12,)):
  """Random vectors with exact duplicates (ties at 0) and near-duplicates."""
  rng = np.random.default_rng(seed)
  queries = rng.normal(size=(num_queries,) + features).astype(np.float32)
  references = rng.normal(size=(num_references,) + features).astype(
      np.float32)
  references[5] = queries[2]
  references[31] = queries[2]
  references[9] = queries[4] + np.float32(1e-3) * rng.normal(
      size=features).astype(np.float32)
  references[20] = queries[4] + np.float32(2e-3) * rng.normal(
      size=features).astype(np.float32)
  return queries, references


@pytest.mark.parametrize("method", ["bits", "matmul"])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_hamming_matches_brute_force(method, k):
  queries, references = token_data(seed=k)
  # 37 and 53 rows with tiles of 8 and 16: both sets end in a ragged tile.
  distances, indices = nearest_neighbors(
      queries, references, "hamming", k, num_classes=3, query_tile=8,
      reference_tile=16, hamming_method=method)
  expected_d, expected_i = brute_force_hamming(queries, references, k)
  assert distances.dtype == jnp.int32
  assert indices.dtype == jnp.int32
  assert distances.shape == (37, k)
  np.testing.assert_array_equal(np.asarray(distances), expected_d)
  np.testing.assert_array_equal(np.asarray(indices), expected_i)


def test_hamming_ties_take_lower_index():
  queries, references = token_data(seed=0)
  distances, indices = nearest_neighbors(
      queries, references, "hamming", 2, num_classes=3, query_tile=8,
      reference_tile=16)
  np.testing.assert_array_equal(np.asarray(distances[0]), [0, 0])
  # Rows 7 and 40 are equal to query 0 and lie in different reference tiles.
  np.testing.assert_array_equal(np.asarray(indices[0]), [7, 40])


def test_hamming_paper_alphabet_default_tiles():
  rng = np.random.default_rng(3)
  queries = rng.integers(0, 6, (300, 16))
  references = rng.integers(0, 6, (2500, 16))
  references[1234] = queries[17]
  distances, indices = nearest_neighbors(
      queries, references, "hamming", 1, num_classes=6)
  expected_d, expected_i = brute_force_hamming(queries, references, 1)
  np.testing.assert_array_equal(np.asarray(distances), expected_d)
  np.testing.assert_array_equal(np.asarray(indices), expected_i)
  assert int(distances[17, 0]) == 0
  assert int(indices[17, 0]) == 1234


def test_hamming_long_alphabet_spans_words():
  # L*q = 20*7 = 140 bits: tokens straddle 32-bit word boundaries.
  rng = np.random.default_rng(4)
  queries = rng.integers(0, 7, (29, 20))
  references = rng.integers(0, 7, (41, 20))
  for method in ("bits", "matmul"):
    distances, indices = nearest_neighbors(
        queries, references, "hamming", 3, num_classes=7, query_tile=16,
        reference_tile=16, hamming_method=method)
    expected_d, expected_i = brute_force_hamming(queries, references, 3)
    np.testing.assert_array_equal(np.asarray(distances), expected_d)
    np.testing.assert_array_equal(np.asarray(indices), expected_i)


def test_hamming_large_reference_set_small_tiles():
  rng = np.random.default_rng(5)
  num_classes, length = 6, 16
  references = rng.integers(0, num_classes, (200_000, length), dtype=np.int32)
  queries = rng.integers(0, num_classes, (100, length), dtype=np.int32)
  queries[:10] = references[rng.choice(200_000, 10, replace=False)]
  distances, indices = nearest_neighbors(
      queries, references, "hamming", 2, num_classes=num_classes,
      query_tile=64, reference_tile=4096)

  # Chunked numpy search with the same (distance, index) order.
  best_d = np.full((100, 2), length + 1)
  best_i = np.zeros((100, 2), dtype=np.int64)
  for start in range(0, 200_000, 25_000):
    chunk = references[start:start + 25_000]
    d = (queries[:, None, :] != chunk[None, :, :]).sum(-1)
    all_d = np.concatenate([best_d, d], axis=1)
    all_i = np.concatenate(
        [best_i, np.broadcast_to(np.arange(start, start + len(chunk)),
                                 d.shape)], axis=1)
    order = np.argsort(all_d, axis=1, kind="stable")[:, :2]
    best_d = np.take_along_axis(all_d, order, axis=1)
    best_i = np.take_along_axis(all_i, order, axis=1)

  np.testing.assert_array_equal(np.asarray(distances), best_d)
  np.testing.assert_array_equal(np.asarray(indices), best_i)
  assert (np.asarray(distances[:10, 0]) == 0).all()


@pytest.mark.parametrize("metric", ["hamming", "sqeuclidean", "cosine"])
def test_temp_memory_flat_in_reference_count(metric):
  if metric == "hamming":
    dtype, features, kwargs = jnp.int32, (16,), {"num_classes": 6}
  else:
    dtype, features, kwargs = jnp.float32, (64,), {}
  search = jax.jit(functools.partial(
      nearest_neighbors, metric=metric, k=3, query_tile=128,
      reference_tile=1024, **kwargs))
  temp_bytes = []
  for num_references in (10_000, 100_000):
    compiled = search.lower(
        jax.ShapeDtypeStruct((1000,) + features, dtype),
        jax.ShapeDtypeStruct((num_references,) + features, dtype)).compile()
    temp_bytes.append(compiled.memory_analysis().temp_size_in_bytes)
  # The inputs grow tenfold; the working memory must not. It differs only
  # through the size of the ragged last tile (784 vs 672 rows).
  assert temp_bytes[1] <= 1.01 * temp_bytes[0]
  assert temp_bytes[0] < 10_000 * 64 * 4


@pytest.mark.parametrize("k", [1, 2, 5])
def test_sqeuclidean_matches_brute_force(k):
  queries, references = float_data(seed=k)
  distances, indices = nearest_neighbors(
      queries, references, "sqeuclidean", k, query_tile=8, reference_tile=16)
  expected_d, expected_i = brute_force_sqeuclidean(queries, references, k)
  assert distances.dtype == jnp.float32
  np.testing.assert_allclose(
      np.asarray(distances), expected_d, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(indices), expected_i)
  # Exact duplicates are exactly 0, and the tie goes to the lower index.
  assert float(distances[2, 0]) == 0.0
  assert int(indices[2, 0]) == 5
  if k >= 2:
    assert float(distances[2, 1]) == 0.0
    assert int(indices[2, 1]) == 31


@pytest.mark.parametrize("k", [1, 2, 5])
def test_cosine_matches_brute_force(k):
  queries, references = float_data(seed=10 + k)
  distances, indices = nearest_neighbors(
      queries, references, "cosine", k, query_tile=8, reference_tile=16)
  expected_d, expected_i = brute_force_cosine(queries, references, k)
  np.testing.assert_allclose(np.asarray(distances), expected_d, atol=2e-6)
  np.testing.assert_array_equal(np.asarray(indices), expected_i)
  assert float(distances[2, 0]) == 0.0
  assert int(indices[2, 0]) == 5


def test_cosine_ignores_brightness_and_contrast():
  queries, references = float_data(seed=20)
  references[44] = 3.0 * queries[6] + 7.0  # same image, other contrast
  distances, indices = nearest_neighbors(queries, references, "cosine", 1)
  assert int(indices[6, 0]) == 44
  assert float(distances[6, 0]) < 1e-6


def test_cosine_constant_vector_is_uncorrelated():
  queries, references = float_data(seed=21)
  queries[0] = 2.5
  distances, _ = nearest_neighbors(queries, references, "cosine", 3)
  np.testing.assert_array_equal(np.asarray(distances[0]), [1.0, 1.0, 1.0])


def near_duplicate_data(seed):
  """Queries far from the reference mean with references 1e-3..6e-3 away.

  The squared gaps (about 1e-6 to 4e-5) are far below fp32 rounding of the
  squared norms (about 1e5), so the norm expansion alone cannot rank them.
  """
  rng = np.random.default_rng(seed)
  features = 64
  queries = (100.0 * rng.normal(size=(4, features))).astype(np.float32)
  references = rng.normal(size=(200, features)).astype(np.float32)
  slots = rng.permutation(np.arange(20, 200))[:24].reshape(4, 6)
  for q in range(4):
    direction = rng.normal(size=features)
    direction /= np.linalg.norm(direction)
    for rank, slot in enumerate(rng.permutation(slots[q])):
      references[slot] = queries[q] + (1e-3 * (rank + 1) * direction).astype(
          np.float32)
  return queries, references


def test_near_duplicates_ranked_exactly():
  queries, references = near_duplicate_data(seed=6)
  expected_d, expected_i = brute_force_sqeuclidean(queries, references, 6)

  # The plain norm expansion in fp32 (centred by the reference mean) misranks
  # these, so this data can tell an exact kernel from an approximate one.
  centre = references.mean(axis=0)
  q, r = queries - centre, references - centre
  naive = ((q * q).sum(1)[:, None] + (r * r).sum(1)[None, :]
           - np.float32(2) * (q @ r.T))
  naive_i = np.argsort(naive, axis=1, kind="stable")[:, :6]
  assert not np.array_equal(naive_i, expected_i)

  distances, indices = nearest_neighbors(
      queries, references, "sqeuclidean", 6, reference_tile=64)
  np.testing.assert_array_equal(np.asarray(indices), expected_i)
  np.testing.assert_allclose(np.asarray(distances), expected_d, rtol=1e-4)


def test_image_shaped_inputs_flatten():
  queries, references = float_data(seed=7, features=(4, 4, 2))
  for metric, brute_force in (("sqeuclidean", brute_force_sqeuclidean),
                              ("cosine", brute_force_cosine)):
    distances, indices = nearest_neighbors(
        queries, references, metric, 2, query_tile=16, reference_tile=32)
    expected_d, expected_i = brute_force(queries, references, 2)
    np.testing.assert_array_equal(np.asarray(indices), expected_i)
    np.testing.assert_allclose(
        np.asarray(distances), expected_d, rtol=1e-5, atol=2e-6)


def test_k_equals_reference_count():
  rng = np.random.default_rng(8)
  queries = rng.normal(size=(5, 12)).astype(np.float32)
  references = rng.normal(size=(7, 12)).astype(np.float32)
  distances, indices = nearest_neighbors(
      queries, references, "sqeuclidean", 7)
  expected_d, expected_i = brute_force_sqeuclidean(queries, references, 7)
  np.testing.assert_array_equal(np.asarray(indices), expected_i)
  np.testing.assert_allclose(np.asarray(distances), expected_d, rtol=1e-5)


def test_inside_jit_matches_eager():
  queries, references = token_data(seed=9)
  search = jax.jit(functools.partial(
      nearest_neighbors, metric="hamming", k=2, num_classes=3, query_tile=8,
      reference_tile=16))
  distances, indices = search(jnp.asarray(queries), jnp.asarray(references))
  expected_d, expected_i = brute_force_hamming(queries, references, 2)
  np.testing.assert_array_equal(np.asarray(distances), expected_d)
  np.testing.assert_array_equal(np.asarray(indices), expected_i)


def test_empty_queries():
  _, references = float_data(seed=0)
  distances, indices = nearest_neighbors(
      np.zeros((0, 12), np.float32), references, "sqeuclidean", 3)
  assert distances.shape == (0, 3)
  assert indices.shape == (0, 3)


SHARDED_SCRIPT = textwrap.dedent("""
    import json
    import sys
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec
    from biasdiff.kernels import nearest_neighbors

    mesh = jax.make_mesh((4,), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    inputs = np.load(sys.argv[1])
    out = {"devices": len(jax.devices())}
    for metric in ("hamming", "sqeuclidean", "cosine"):
      kind = "tokens" if metric == "hamming" else "images"
      kwargs = {"num_classes": 6} if metric == "hamming" else {}
      queries = jax.device_put(inputs[kind + "_queries"], sharding)
      distances, indices = nearest_neighbors(
          queries, inputs[kind + "_references"], metric, 3, query_tile=4,
          reference_tile=64, **kwargs)
      out[metric] = {
          "query_axes": indices.sharding.spec[0],
          "num_shards": len(indices.addressable_shards),
          "distances": np.asarray(distances).astype(float).tolist(),
          "indices": np.asarray(indices).tolist(),
      }

    # An Auto-typed 2 x 2 mesh with the query axis over both mesh axes and
    # the references sharded too; the kernel replicates the references.
    auto_mesh = jax.make_mesh((2, 2), ("a", "b"),
                              axis_types=(jax.sharding.AxisType.Auto,) * 2)
    queries = jax.device_put(inputs["tokens_queries"],
                             NamedSharding(auto_mesh, PartitionSpec(("a", "b"))))
    references = jax.device_put(inputs["tokens_references"],
                                NamedSharding(auto_mesh, PartitionSpec("b")))
    distances, indices = nearest_neighbors(
        queries, references, "hamming", 3, num_classes=6, query_tile=4)
    out["hamming_auto_mesh"] = {
        "query_axes": indices.sharding.spec[0],
        "num_shards": len(indices.addressable_shards),
        "distances": np.asarray(distances).astype(float).tolist(),
        "indices": np.asarray(indices).tolist(),
    }
    print(json.dumps(out))
""")


def test_sharded_queries_on_four_devices(tmp_path):
  rng = np.random.default_rng(0)
  tokens_q = rng.integers(0, 6, (40, 16))
  tokens_r = rng.integers(0, 6, (300, 16))
  tokens_r[123] = tokens_q[5]
  images_q, images_r = float_data(seed=11, num_queries=40, num_references=300,
                                  features=(8, 8))
  inputs = tmp_path / "inputs.npz"
  np.savez(inputs, tokens_queries=tokens_q, tokens_references=tokens_r,
           images_queries=images_q, images_references=images_r)

  env = dict(os.environ)
  # XLA reads the flag when JAX initialises, so it must be set in a fresh
  # process, before jax is imported.
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run(
      [sys.executable, "-c", SHARDED_SCRIPT, str(inputs)],
      capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300,
      check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["devices"] == 4

  expected = {
      "hamming": brute_force_hamming(tokens_q, tokens_r, 3),
      "sqeuclidean": brute_force_sqeuclidean(images_q, images_r, 3),
      "cosine": brute_force_cosine(images_q, images_r, 3),
  }
  expected["hamming_auto_mesh"] = expected["hamming"]
  for metric, (expected_d, expected_i) in expected.items():
    case = out[metric]
    assert case["num_shards"] == 4, metric
    expected_axes = ["a", "b"] if metric == "hamming_auto_mesh" else "data"
    assert case["query_axes"] == expected_axes, metric
    np.testing.assert_array_equal(case["indices"], expected_i, err_msg=metric)
    np.testing.assert_allclose(case["distances"], expected_d, rtol=1e-5,
                               atol=2e-6, err_msg=metric)
  assert out["hamming"]["indices"][5][0] == 123
  assert out["sqeuclidean"]["indices"][2][:2] == [5, 31]


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda q, r: nearest_neighbors(q, r, "manhattan"),
         ValueError, "Unknown metric 'manhattan'"),
        (lambda q, r: nearest_neighbors(q, r[:, :5], "sqeuclidean"),
         ValueError, "feature shape"),
        (lambda q, r: nearest_neighbors(q[0], r, "sqeuclidean"),
         ValueError, "must have shape"),
        (lambda q, r: nearest_neighbors(q, r, "sqeuclidean", 0),
         ValueError, "got k=0"),
        (lambda q, r: nearest_neighbors(q, r, "sqeuclidean", 54),
         ValueError, "number of references \\(53\\)"),
        (lambda q, r: nearest_neighbors(q, r, "sqeuclidean", 1.5),
         ValueError, "k must be an integer"),
        (lambda q, r: nearest_neighbors(q, r, "sqeuclidean", query_tile=0),
         ValueError, "query_tile must be a positive integer"),
        (lambda q, r: nearest_neighbors(q, r, "cosine", hamming_method="x"),
         ValueError, "Unknown hamming_method 'x'"),
        (lambda q, r: nearest_neighbors(q, r, "sqeuclidean",
                                        extra_candidates=-1),
         ValueError, "extra_candidates"),
        (lambda q, r: nearest_neighbors(q[:, :1], r[:, :1], "cosine"),
         ValueError, "at least 2 features"),
    ],
)
def test_invalid_arguments_raise(call, error, message):
  queries, references = float_data(seed=0)
  with pytest.raises(error, match=message):
    call(queries, references)


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_inputs_raise(metric, bad):
  queries, references = float_data(seed=0)
  queries_bad = queries.copy()
  queries_bad[3, 4] = bad
  with pytest.raises(ValueError, match="queries contain NaN or infinite"):
    nearest_neighbors(queries_bad, references, metric)
  references_bad = references.copy()
  references_bad[8, 1] = bad
  with pytest.raises(ValueError, match="references contain NaN or infinite"):
    nearest_neighbors(jnp.asarray(queries), jnp.asarray(references_bad),
                      metric)
  # The escape hatch skips the check; the results are then undefined.
  distances, indices = nearest_neighbors(
      queries, references_bad, metric, 2, check_finite=False)
  assert distances.shape == indices.shape == (37, 2)


def test_hamming_token_errors():
  queries, references = token_data(seed=0)
  with pytest.raises(ValueError, match="needs num_classes"):
    nearest_neighbors(queries, references, "hamming")
  with pytest.raises(ValueError, match="num_classes must be a positive"):
    nearest_neighbors(queries, references, "hamming", num_classes=0)
  high = references.copy()
  high[3, 2] = 3
  with pytest.raises(ValueError, match=r"references contain tokens in \[0, 3\]"):
    nearest_neighbors(queries, high, "hamming", num_classes=3)
  negative = queries.copy()
  negative[0, 0] = -1
  with pytest.raises(ValueError, match=r"queries contain tokens in \[-1, 2\]"):
    nearest_neighbors(jnp.asarray(negative), references, "hamming",
                      num_classes=3)
  with pytest.raises(TypeError, match="integer tokens"):
    nearest_neighbors(queries.astype(np.float32), references, "hamming",
                      num_classes=3)
  with pytest.raises(ValueError, match=r"shape \[N, L\]"):
    nearest_neighbors(queries[:, :, None], references[:, :, None], "hamming",
                      num_classes=3)
