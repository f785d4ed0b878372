"""Benchmarks of the nearest-neighbour kernels against numpy and faiss-cpu.

Sizes follow the analyses that use the kernels: 50,000 generated against
12,000 training sequences of 16 tokens over 6 symbols (Hamming), and 5,000
generated against 1,024 training images of 32 x 32 (squared Euclidean and
cosine). Baselines, measured in the same run:

- numpy: vectorised brute force with BLAS. For Hamming it is the one-hot
  matrix product in query chunks with the lower-index tie rule, which is
  exact. For the float metrics it is the norm expansion without the exact
  recomputation, so it may misrank near-duplicates.
- faiss-cpu `IndexFlatL2` (exact flat search) on the same vectors: one-hot
  vectors for Hamming, where the squared L2 distance is 2 x Hamming, and
  standardised vectors for cosine, where it is 2 x (1 - correlation). For
  Hamming, `IndexBinaryFlat` on the packed one-hot bits is listed as well,
  since it is faiss's own exact Hamming search. Every faiss time includes
  building the index and the one-hot or standardising preprocessing.
"""

import functools
import importlib
import logging
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from biasdiff.kernels import nearest_neighbors

NAME = "kernels"
TITLE = "Nearest-neighbour kernels"

HAMMING_LENGTH = 16
HAMMING_CLASSES = 6
IMAGE_SHAPE = (32, 32)

# Problem sizes (queries, references[, features]); tests shrink them.
SIZES = {
    # The analyses' sizes: generated vs training sequences and images.
    "hamming": (50_000, 12_000),
    "images": (5_000, 1_024),
    # A large L2 search for the fraction of matmul speed.
    "l2_cpu": (8_192, 16_384, 1024),
    "l2_device": (65_536, 262_144, 1024),
    # Extra accelerator-only rows.
    "device_hamming": ((50_000, 70_000), (1_000_000, 1_000_000)),
    "device_images": ((100_000, 100_000),),
    # Compiled (never allocated) memory for growing reference sets.
    "memory_references": (10_000, 100_000, 1_000_000),
    "memory_queries": (50_000, 5_000),
    # (query_tile, reference_tile) pairs timed at the Hamming size on CPU.
    "tile_sweep": ((512, 2048), (1024, 2048), (1024, 1024), (2048, 1024),
                   (512, 4096)),
}


def _try_import_faiss() -> Optional[Any]:
  try:
    return importlib.import_module("faiss")
  except ImportError:
    return None


# ----------------------------------------------------------------------------
# Data.


def hamming_data(num_queries: int, num_references: int, seed: int = 0):
  """Uniform random tokens [Q, 16] and [R, 16] with planted exact copies."""
  rng = np.random.default_rng(seed)
  queries = rng.integers(0, HAMMING_CLASSES, (num_queries, HAMMING_LENGTH),
                         dtype=np.int32)
  references = rng.integers(0, HAMMING_CLASSES,
                            (num_references, HAMMING_LENGTH), dtype=np.int32)
  copies = min(100, num_queries, num_references)
  queries[:copies] = references[rng.choice(num_references, copies,
                                           replace=False)]
  return queries, references


def image_data(num_queries: int, num_references: int, seed: int = 0,
               shape: tuple[int, ...] = IMAGE_SHAPE):
  """Gaussian images [N, *shape] with planted exact and near copies."""
  rng = np.random.default_rng(seed)
  queries = rng.standard_normal((num_queries,) + shape, dtype=np.float32)
  references = rng.standard_normal((num_references,) + shape,
                                   dtype=np.float32)
  copies = min(50, num_queries // 2, num_references)
  queries[:copies] = references[:copies]
  queries[copies:2 * copies] = references[:copies] + 1e-3 * rng.standard_normal(
      (copies,) + shape, dtype=np.float32)
  return queries, references


# ----------------------------------------------------------------------------
# numpy baselines.


def numpy_hamming(queries, references, num_classes, chunk=4096):
  """Exact Hamming 1-NN by one-hot matrix products in query chunks."""
  eye = np.eye(num_classes, dtype=np.float32)
  reference_code = eye[references].reshape(len(references), -1)
  length = queries.shape[1]
  distances = np.empty(len(queries), np.int32)
  indices = np.empty(len(queries), np.int64)
  for start in range(0, len(queries), chunk):
    query_code = eye[queries[start:start + chunk]].reshape(
        -1, reference_code.shape[1])
    matches = query_code @ reference_code.T
    best = np.argmax(matches, axis=1)  # first maximum = lower index on ties
    indices[start:start + chunk] = best
    distances[start:start + chunk] = length - np.take_along_axis(
        matches, best[:, None], axis=1)[:, 0]
  return distances, indices


def _numpy_top_k(distances, k):
  part = np.argpartition(distances, k - 1, axis=1)[:, :k]
  order = np.argsort(np.take_along_axis(distances, part, axis=1), axis=1,
                     kind="stable")
  best = np.take_along_axis(part, order, axis=1)
  return np.take_along_axis(distances, best, axis=1), best


def numpy_sqeuclidean(queries, references, k, chunk=2048):
  """Norm-expansion k-NN on centred data, in query chunks (not refined)."""
  queries = queries.reshape(len(queries), -1)
  references = references.reshape(len(references), -1)
  centre = references.mean(axis=0)
  references = references - centre
  reference_norm = (references * references).sum(axis=1)
  out_d, out_i = [], []
  for start in range(0, len(queries), chunk):
    query = queries[start:start + chunk] - centre
    distances = ((query * query).sum(axis=1)[:, None] + reference_norm[None, :]
                 - 2.0 * (query @ references.T))
    d, i = _numpy_top_k(np.maximum(distances, 0.0), k)
    out_d.append(d)
    out_i.append(i)
  return np.concatenate(out_d), np.concatenate(out_i)


def numpy_standardize(x):
  x = x.reshape(len(x), -1)
  centred = x - x.mean(axis=1, keepdims=True)
  scaled = centred / (x.std(axis=1, ddof=1, keepdims=True) + 1e-12)
  norm = np.linalg.norm(scaled, axis=1, keepdims=True)
  return (scaled / np.maximum(norm, 1e-12)).astype(np.float32)


def numpy_cosine(queries, references, k, chunk=2048):
  """1 - Pearson k-NN with standardised vectors, in query chunks."""
  query_z = numpy_standardize(queries)
  reference_z = numpy_standardize(references)
  out_d, out_i = [], []
  for start in range(0, len(query_z), chunk):
    distances = 1.0 - query_z[start:start + chunk] @ reference_z.T
    d, i = _numpy_top_k(distances, k)
    out_d.append(d)
    out_i.append(i)
  return np.concatenate(out_d), np.concatenate(out_i)


# ----------------------------------------------------------------------------
# faiss baselines.


def faiss_hamming_l2(faiss, queries, references, num_classes):
  """Hamming 1-NN as exact L2 search on one-hot vectors: L2^2 = 2 Hamming."""
  eye = np.eye(num_classes, dtype=np.float32)
  reference_code = eye[references].reshape(len(references), -1)
  query_code = eye[queries].reshape(len(queries), -1)
  index = faiss.IndexFlatL2(reference_code.shape[1])
  index.add(reference_code)
  distances, indices = index.search(query_code, 1)
  return np.rint(distances[:, 0] / 2).astype(np.int32), indices[:, 0]


def faiss_hamming_binary(faiss, queries, references, num_classes):
  """Hamming 1-NN with IndexBinaryFlat on packed one-hot bits (2 bits per mismatch)."""
  eye = np.eye(num_classes, dtype=np.uint8)
  reference_bits = np.packbits(eye[references].reshape(len(references), -1),
                               axis=1)
  query_bits = np.packbits(eye[queries].reshape(len(queries), -1), axis=1)
  index = faiss.IndexBinaryFlat(reference_bits.shape[1] * 8)
  index.add(reference_bits)
  distances, indices = index.search(query_bits, 1)
  return (distances[:, 0] // 2).astype(np.int32), indices[:, 0]


def faiss_sqeuclidean(faiss, queries, references, k):
  references = np.ascontiguousarray(references.reshape(len(references), -1))
  index = faiss.IndexFlatL2(references.shape[1])
  index.add(references)
  return index.search(np.ascontiguousarray(queries.reshape(len(queries), -1)),
                      k)


def faiss_cosine(faiss, queries, references, k):
  """1 - Pearson via L2 on standardised unit vectors: L2^2 = 2 (1 - r)."""
  reference_z = numpy_standardize(references)
  index = faiss.IndexFlatL2(reference_z.shape[1])
  index.add(reference_z)
  distances, indices = index.search(numpy_standardize(queries), k)
  return distances / 2.0, indices


# ----------------------------------------------------------------------------
# Measurements.


def _speed_row(case: str, method: str, timing: common.Timing,
               num_queries: int, flops: float,
               agrees: Optional[bool]) -> dict[str, Any]:
  row = {"case": case, "method": method}
  row.update(timing.as_dict())
  row["queries_per_s"] = num_queries / timing.median
  row["GFLOP/s"] = flops / timing.median / 1e9
  if agrees is not None:
    row["agrees_with_kernel"] = agrees
  return row


def measure_hamming(num_queries: int, num_references: int,
                    faiss: Optional[Any], repeats: int, baselines: bool,
                    rows: list[dict[str, Any]],
                    timings: dict[tuple[str, str], common.Timing]) -> None:
  """Append Hamming speed rows to `rows` and their timings to `timings`."""
  queries, references = hamming_data(num_queries, num_references)
  case = (f"Hamming 1-NN, {num_queries:,} x {num_references:,}, "
          f"L={HAMMING_LENGTH}, q={HAMMING_CLASSES}")
  # One-hot matrix-product flops, also quoted for the bit-packed path.
  flops = 2.0 * num_queries * num_references * HAMMING_LENGTH * HAMMING_CLASSES
  queries_device = jnp.asarray(queries)
  references_device = jnp.asarray(references)

  kernel_results = {}
  for method in ("auto", "matmul"):
    search = functools.partial(
        nearest_neighbors, metric="hamming", k=1, num_classes=HAMMING_CLASSES,
        hamming_method=method)
    timing = common.time_call(search, queries_device, references_device,
                              repeats=repeats)
    distances, indices = search(queries_device, references_device)
    kernel_results[method] = (np.asarray(distances)[:, 0],
                              np.asarray(indices)[:, 0])
    label = "kernel (auto: bits on CPU)" if method == "auto" else \
        "kernel (bf16 one-hot matmul)"
    rows.append(_speed_row(case, label, timing, num_queries, flops, None))
    timings[("hamming", method)] = timing
  kernel_d, kernel_i = kernel_results["auto"]
  rows[-1]["agrees_with_kernel"] = bool(
      (kernel_results["matmul"][0] == kernel_d).all()
      and (kernel_results["matmul"][1] == kernel_i).all())

  if not baselines:
    return
  timing = common.time_call(numpy_hamming, queries, references,
                            HAMMING_CLASSES, repeats=max(1, repeats // 2))
  numpy_d, numpy_i = numpy_hamming(queries, references, HAMMING_CLASSES)
  rows.append(_speed_row(
      case, "numpy one-hot matmul (exact)", timing, num_queries, flops,
      bool((numpy_d == kernel_d).all() and (numpy_i == kernel_i).all())))
  timings[("hamming", "numpy")] = timing
  if faiss is None:
    return
  for label, fn, key in (
      ("faiss IndexFlatL2 on one-hot", faiss_hamming_l2, "faiss"),
      ("faiss IndexBinaryFlat on one-hot bits", faiss_hamming_binary,
       "faiss_binary")):
    timing = common.time_call(fn, faiss, queries, references, HAMMING_CLASSES,
                              repeats=max(1, repeats // 2))
    faiss_d, _ = fn(faiss, queries, references, HAMMING_CLASSES)
    # faiss breaks ties in its own order, so only the distances are compared.
    rows.append(_speed_row(case, label, timing, num_queries, flops,
                           bool((faiss_d == kernel_d).all())))
    timings[("hamming", key)] = timing


def measure_images(metric: str, k: int, num_queries: int,
                   num_references: int, faiss: Optional[Any], repeats: int,
                   baselines: bool, rows: list[dict[str, Any]],
                   timings: dict[tuple[str, str], common.Timing]) -> None:
  """Append image-search speed rows to `rows` and timings to `timings`."""
  queries, references = image_data(num_queries, num_references)
  features = int(np.prod(IMAGE_SHAPE))
  case = (f"{metric} {k}-NN, {num_queries:,} x {num_references:,} images "
          f"{IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}")
  flops = 2.0 * num_queries * num_references * features
  search = functools.partial(nearest_neighbors, metric=metric, k=k)
  queries_device = jnp.asarray(queries)
  references_device = jnp.asarray(references)
  timing = common.time_call(search, queries_device, references_device,
                            repeats=repeats)
  rows.append(_speed_row(case, "kernel (exact recompute)", timing,
                         num_queries, flops, None))
  timings[(metric, "kernel")] = timing
  kernel_d, kernel_i = (np.asarray(a) for a in search(queries_device,
                                                      references_device))
  if not baselines:
    return

  numpy_fn = numpy_sqeuclidean if metric == "sqeuclidean" else numpy_cosine
  timing = common.time_call(numpy_fn, queries, references, k,
                            repeats=repeats)
  numpy_d, numpy_i = numpy_fn(queries, references, k)
  rows.append(_speed_row(
      case, "numpy norm expansion (not refined)", timing, num_queries, flops,
      bool(np.allclose(numpy_d, kernel_d, rtol=1e-3, atol=1e-3))))
  timings[(metric, "numpy")] = timing
  if faiss is None:
    return
  faiss_fn = faiss_sqeuclidean if metric == "sqeuclidean" else faiss_cosine
  timing = common.time_call(faiss_fn, faiss, queries, references, k,
                            repeats=repeats)
  faiss_d, _ = faiss_fn(faiss, queries, references, k)
  rows.append(_speed_row(
      case, "faiss IndexFlatL2", timing, num_queries, flops,
      bool(np.allclose(faiss_d, kernel_d, rtol=1e-3, atol=1e-3))))
  timings[(metric, "faiss")] = timing


def measure_l2_efficiency(num_queries: int, num_references: int,
                          features: int, repeats: int, faiss: Optional[Any]
                          ) -> tuple[dict[str, Any], float]:
  """Return (row, fraction of the measured fp32 matmul GFLOP/s).

  The fraction compares median wall times of the kernel and of a 2048^3
  matmul measured just before and after it (the faster of the two). The
  row also gives the fraction in process CPU time, which other programs on
  a shared CPU disturb less.
  """
  rng = np.random.default_rng(1)
  queries = jnp.asarray(rng.standard_normal((num_queries, features),
                                            dtype=np.float32))
  references = jnp.asarray(rng.standard_normal((num_references, features),
                                               dtype=np.float32))
  search = functools.partial(nearest_neighbors, metric="sqeuclidean", k=1,
                             check_finite=False)
  matmul_n = 2048
  matmul_before = common.measure_matmul(jnp.float32, matmul_n)
  timing = common.time_call(search, queries, references, repeats=repeats)
  matmul_after = common.measure_matmul(jnp.float32, matmul_n)
  matmul = min((matmul_before, matmul_after), key=lambda t: t.median)
  matmul_flops = 2.0 * matmul_n**3
  flops = 2.0 * num_queries * num_references * features
  kernel_gflops = flops / timing.median / 1e9
  matmul_gflops = matmul_flops / matmul.median / 1e9
  fraction = kernel_gflops / matmul_gflops
  cpu_fraction = ((flops / timing.cpu_median)
                  / (matmul_flops / matmul.cpu_median))
  row = {"case": (f"sqeuclidean 1-NN, {num_queries:,} x {num_references:,}, "
                  f"D={features}"),
         "kernel_GFLOP/s": kernel_gflops,
         f"matmul_GFLOP/s (fp32 {matmul_n}^3)": matmul_gflops,
         "fraction (wall time)": fraction,
         "fraction (CPU time)": cpu_fraction}
  row.update(timing.as_dict())
  if faiss is not None:
    queries_host = np.asarray(queries)
    references_host = np.asarray(references)
    faiss_timing = common.time_call(faiss_sqeuclidean, faiss, queries_host,
                                    references_host, 1, repeats=repeats)
    row["faiss_IndexFlatL2_seconds_median"] = faiss_timing.median
    row["speed-up over faiss"] = faiss_timing.median / timing.median
  return row, fraction


def measure_memory(reference_counts: tuple[int, ...],
                   query_counts: tuple[int, int]
                   ) -> tuple[list[dict[str, Any]], dict[str, float]]:
  """Compiled memory for growing reference sets, without allocating them."""
  rows = []
  growth = {}
  cases = (
      ("hamming", query_counts[0], (HAMMING_LENGTH,), jnp.int32,
       {"num_classes": HAMMING_CLASSES}),
      ("sqeuclidean", query_counts[1], IMAGE_SHAPE, jnp.float32, {}),
  )
  for metric, num_queries, shape, dtype, kwargs in cases:
    search = functools.partial(nearest_neighbors, metric=metric, k=2,
                               **kwargs)
    temps = []
    for count in reference_counts:
      memory = common.compiled_memory(
          search, jax.ShapeDtypeStruct((num_queries,) + shape, dtype),
          jax.ShapeDtypeStruct((count,) + shape, dtype))
      temps.append(memory["temp"])
      rows.append({"metric": metric, "queries": num_queries,
                   "references": count,
                   "working_memory (XLA temp)": common.format_bytes(
                       memory["temp"]),
                   "inputs": common.format_bytes(memory["arguments"]),
                   "outputs": common.format_bytes(memory["outputs"]),
                   "total": common.format_bytes(memory["total"])})
    growth[metric] = temps[-1] / temps[0]
  return rows, growth


def measure_tile_sweep(repeats: int) -> list[dict[str, Any]]:
  """Time the paper-size Hamming search for a few tile sizes."""
  queries, references = hamming_data(*SIZES["hamming"])
  queries = jnp.asarray(queries)
  references = jnp.asarray(references)
  rows = []
  for query_tile, reference_tile in SIZES["tile_sweep"]:
    search = functools.partial(
        nearest_neighbors, metric="hamming", k=1, num_classes=HAMMING_CLASSES,
        query_tile=query_tile, reference_tile=reference_tile)
    timing = common.time_call(search, queries, references, repeats=repeats)
    row = {"query_tile": query_tile, "reference_tile": reference_tile}
    row.update(timing.as_dict())
    rows.append(row)
  return rows


def _ratio_goal(goal: str, timings, slower: str, faster: str,
                note: str = "") -> dict[str, Any]:
  if (faster not in timings) or (slower not in timings):
    return {"goal": goal, "value": None, "target": 1.0,
            "higher_is_better": True, "unit": "x",
            "note": note or "baseline not measured"}
  return {"goal": goal,
          "value": timings[slower].median / timings[faster].median,
          "target": 1.0, "higher_is_better": True, "unit": "x",
          "note": note}


def run(device_mode: bool = False) -> dict[str, Any]:
  faiss = _try_import_faiss()
  notes = []
  if faiss is None:
    notes.append("faiss-cpu is not installed, so its rows are missing; "
                 "install the bench extra (`pip install -e '.[bench]'`).")
  else:
    options = faiss.get_compile_options().strip()
    notes.append(f"faiss-cpu {faiss.__version__} ({options}) with "
                 f"{faiss.omp_get_max_threads()} OpenMP threads.")
  notes.append(
      "GFLOP/s for Hamming counts the one-hot matrix product "
      "(2 Q R L q flops) for every method, also for the bit-packed path, "
      "which does the same count with popcounts.")

  rows: list[dict[str, Any]] = []
  timings: dict[tuple[str, str], common.Timing] = {}
  logging.info("Hamming at the paper size")
  measure_hamming(*SIZES["hamming"], faiss, repeats=7, baselines=True,
                  rows=rows, timings=timings)
  logging.info("Images at the paper size")
  measure_images("sqeuclidean", 2, *SIZES["images"], faiss, repeats=7,
                 baselines=True, rows=rows, timings=timings)
  measure_images("cosine", 1, *SIZES["images"], faiss, repeats=7,
                 baselines=True, rows=rows, timings=timings)
  if device_mode:
    logging.info("Accelerator sizes")
    for num_queries, num_references in SIZES["device_hamming"]:
      measure_hamming(num_queries, num_references, None, repeats=3,
                      baselines=False, rows=rows, timings={})
    for num_queries, num_references in SIZES["device_images"]:
      measure_images("sqeuclidean", 2, num_queries, num_references, None,
                     repeats=3, baselines=False, rows=rows, timings={})

  logging.info("L2 efficiency")
  if device_mode:
    l2_row, l2_fraction = measure_l2_efficiency(*SIZES["l2_device"],
                                                repeats=3, faiss=None)
  else:
    l2_row, l2_fraction = measure_l2_efficiency(*SIZES["l2_cpu"], repeats=3,
                                                faiss=faiss)
  logging.info("Memory")
  memory_rows, growth = measure_memory(SIZES["memory_references"],
                                       SIZES["memory_queries"])
  tables = [
      {"title": "Fraction of matrix-product speed reached by the L2 kernel",
       "rows": [l2_row]},
      {"title": "Compiled memory as the reference set grows (k = 2, default "
                "tiles)", "rows": memory_rows},
  ]
  if not device_mode:
    logging.info("Tile sweep")
    num_queries, num_references = SIZES["hamming"]
    tables.append({
        "title": (f"Hamming {num_queries:,} x {num_references:,} by tile "
                  "size (CPU)"),
        "rows": measure_tile_sweep(repeats=5)})

  goals = []
  if not device_mode:
    num_queries, num_references = SIZES["hamming"]
    goals.append({
        "goal": (f"Hamming 1-NN {num_queries:,} x {num_references:,} "
                 f"(L={HAMMING_LENGTH}, q={HAMMING_CLASSES}) on a 2-core CPU"),
        "value": timings[("hamming", "auto")].median, "target": 0.4,
        "higher_is_better": False, "unit": "s"})
  goals.append({
      "goal": "L2 kernel reaches >= 50% of measured fp32 matmul GFLOP/s",
      "value": l2_fraction, "target": 0.5, "higher_is_better": True})
  for metric, label in (("hamming", "Hamming"), ("sqeuclidean", "L2"),
                        ("cosine", "cosine")):
    kernel_key = (metric, "auto") if metric == "hamming" else (metric,
                                                                "kernel")
    goals.append(_ratio_goal(
        f"{label} kernel faster than faiss IndexFlatL2 (speed-up)",
        timings, (metric, "faiss"), kernel_key))
  goals.append(_ratio_goal(
      "Hamming kernel faster than faiss IndexBinaryFlat (speed-up)",
      timings, ("hamming", "faiss_binary"), ("hamming", "auto"),
      note="not a stated goal; faiss's own exact Hamming search"))
  smallest, largest = (SIZES["memory_references"][0],
                       SIZES["memory_references"][-1])
  for metric, ratio in growth.items():
    goals.append({
        "goal": (f"{metric} working memory at {largest:,} vs {smallest:,} "
                 "references"),
        "value": ratio, "target": 1.05, "higher_is_better": False,
        "unit": "x"})
  if device_mode:
    notes.append("Accelerator rows use larger inputs; the numpy and faiss "
                 "baselines run on the host CPU at the paper sizes only.")
  return {"rows": rows, "tables": tables, "goals": goals, "notes": notes}
