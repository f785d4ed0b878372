"""Tests of the error-bar conventions: mean and SE, jackknife, bootstrap, grid argmin."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from biasdiff.metrics import probes, stats


def test_mean_and_se_matches_numpy_ddof1():
  values = np.random.default_rng(0).standard_normal((3, 11))
  summary = stats.mean_and_se(values, axis=-1)
  np.testing.assert_allclose(summary.mean, values.mean(-1), atol=1e-6)
  np.testing.assert_allclose(summary.se, values.std(-1, ddof=1) / np.sqrt(11), rtol=1e-5)
  assert summary.count == 11


def test_mean_and_se_ddof0_and_axis0():
  values = np.random.default_rng(1).standard_normal((7, 2))
  summary = stats.mean_and_se(values, axis=0, ddof=0)
  np.testing.assert_allclose(summary.se, values.std(0) / np.sqrt(7), rtol=1e-5)
  assert summary.count == 7


def test_mean_and_se_single_value_has_nan_se():
  summary = stats.mean_and_se(jnp.array([2.5]))
  assert float(summary.mean) == 2.5
  assert np.isnan(summary.se)


@pytest.mark.parametrize("values, message", [
    (np.zeros((0,)), "no values"),
    (np.array([1.0, np.nan]), "NaN"),
    (np.array([1.0, np.inf]), "NaN or infinite"),
])
def test_mean_and_se_rejects_bad_input(values, message):
  with pytest.raises(ValueError, match=message):
    stats.mean_and_se(values)


def brute_force_jackknife(values, groups, reduce):
  labels = sorted(set(groups.ravel().tolist()))
  estimates = []
  for label in labels:
    keep = [p for p in range(len(values)) if label not in groups[p]]
    if keep:
      estimates.append(reduce(values[keep]))
  estimates = np.array(estimates)
  g = len(estimates)
  return np.sqrt((g - 1) / g * np.sum((estimates - estimates.mean())**2))


@pytest.mark.parametrize("statistic, reduce", [("mean", np.mean), ("median", np.median)])
def test_jackknife_matches_leave_one_group_out_loop(statistic, reduce):
  pairs = np.array(list(itertools.combinations(range(5), 2)))
  values = np.random.default_rng(2).standard_normal(len(pairs))
  result = stats.jackknife(values, pairs, statistic)
  assert result.count == 10
  assert result.num_groups == 5
  np.testing.assert_allclose(result.estimate, reduce(values))
  np.testing.assert_allclose(result.se, brute_force_jackknife(values, pairs, reduce), rtol=1e-12)


def test_jackknife_of_independent_units_is_the_usual_se():
  # With one group per value, the delete-one jackknife of the mean equals std/sqrt(n).
  values = np.random.default_rng(3).standard_normal(9)
  result = stats.jackknife(values, np.arange(9))
  np.testing.assert_allclose(result.se, values.std(ddof=1) / 3.0, rtol=1e-12)


def test_jackknife_over_curves_reduces_axis0():
  pairs = np.array(list(itertools.combinations(range(4), 2)))
  curves = np.random.default_rng(4).standard_normal((len(pairs), 3))
  result = stats.jackknife(curves, pairs)
  assert result.estimate.shape == (3,)
  for c in range(3):
    np.testing.assert_allclose(result.se[c], brute_force_jackknife(curves[:, c], pairs, np.mean))


def test_jackknife_single_pair_has_nan_se():
  result = stats.jackknife(np.array([0.3]), np.array([[0, 1]]))
  assert result.estimate == pytest.approx(0.3)
  assert np.isnan(result.se)


def test_jackknife_rejects_mismatched_groups():
  with pytest.raises(ValueError, match="groups must have shape"):
    stats.jackknife(np.zeros(3), np.zeros((4, 2), int))


def test_bootstrap_is_seeded_and_brackets_the_estimate():
  values = np.random.default_rng(5).standard_normal(200)
  first = stats.bootstrap(values, 7, "median", num_resamples=300)
  again = stats.bootstrap(values, 7, "median", num_resamples=300)
  other = stats.bootstrap(values, 8, "median", num_resamples=300)
  assert first == again
  assert first.se != other.se
  assert first.estimate == pytest.approx(np.median(values))
  assert first.low <= first.estimate <= first.high
  assert first.count == 200


def test_bootstrap_se_of_mean_is_close_to_analytic():
  values = np.random.default_rng(6).standard_normal(400)
  result = stats.bootstrap(values, 0, "mean", num_resamples=2000)
  analytic = values.std(ddof=1) / np.sqrt(400)
  assert result.se == pytest.approx(analytic, rel=0.1)


def test_bootstrap_resamples_do_not_depend_on_chunking(monkeypatch):
  values = np.arange(50.0)
  whole = stats.bootstrap(values, 3, "mean", num_resamples=40)
  monkeypatch.setattr(stats, "_BOOTSTRAP_CHUNK_ENTRIES", 120)  # 2 resamples per chunk
  chunked = stats.bootstrap(values, 3, "mean", num_resamples=40)
  assert whole == chunked


def test_bootstrap_rejects_bad_input():
  with pytest.raises(ValueError, match="finite"):
    stats.bootstrap(np.array([1.0, np.nan]), 0)
  with pytest.raises(ValueError, match="num_resamples"):
    stats.bootstrap(np.ones(3), 0, num_resamples=1)
  with pytest.raises(ValueError, match="confidence"):
    stats.bootstrap(np.ones(3), 0, confidence=1.5)


def test_grid_argmin_mean_curve_and_units():
  grid = np.array([100, 125, 160, 200])
  curves = np.array([
      [3.0, 1.0, 2.0, 4.0],
      [3.0, 2.0, 1.0, 4.0],
      [1.0, 2.0, 3.0, 4.0],
  ])
  result = stats.grid_argmin(curves, grid)
  # Mean curve [7/3, 5/3, 2, 4] has its minimum at index 1.
  assert result.index == 1
  assert result.value == 125
  np.testing.assert_array_equal(result.unit_indices, [1, 2, 0])
  np.testing.assert_array_equal(result.unit_values, [125, 160, 100])
  np.testing.assert_allclose(result.unit_quartiles, np.quantile([125, 160, 100], [.25, .5, .75]))
  np.testing.assert_array_equal(result.unit_range, [100, 160])
  assert result.count == 3


def test_grid_argmin_ties_go_to_earliest_and_maximize():
  grid = np.arange(4)
  assert stats.grid_argmin(np.array([2.0, 1.0, 1.0, 3.0]), grid).index == 1
  assert stats.grid_argmin(np.array([2.0, 1.0, 1.0, 3.0]), grid, maximize=True).index == 3
  median = stats.grid_argmin(np.array([[0.0, 5.0], [9.0, 1.0], [8.0, 2.0]]), np.arange(2),
                             aggregate="median")
  assert median.index == 1


def test_grid_argmin_rejects_bad_input():
  with pytest.raises(ValueError, match="grid must have shape"):
    stats.grid_argmin(np.zeros((2, 3)), np.arange(4))
  with pytest.raises(ValueError, match="NaN"):
    stats.grid_argmin(np.array([1.0, np.nan]), np.arange(2))


def test_time_at_fraction_uses_decimal_value():
  assert probes.time_at_fraction(0.15, 500) == 75
  assert probes.time_at_fraction(0.3, 500) == 150
  assert probes.time_at_fraction(0.085, 500) == 42
  assert probes.time_at_fraction(0.12, 500) == 60
  with pytest.raises(ValueError, match="fraction"):
    probes.time_at_fraction(0.0, 500)


def test_map_in_batches_pads_and_keeps_order():
  x = jnp.arange(10.0)
  out = probes.map_in_batches(lambda b: jnp.stack([b, 2 * b]), x, 3, out_axis=-1)
  np.testing.assert_array_equal(out, np.stack([np.arange(10.0), 2 * np.arange(10.0)]))
