"""Tests for the hashed dropout masks: rate, independence, determinism and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biasdiff.models import dropout


def test_keep_fraction_matches_the_rate():
  mask = np.asarray(dropout.keep_mask(jax.random.key(0), (1000, 1000), 0.9))
  # Binomial standard error of the mean over 10^6 elements is 3e-4.
  assert abs(mask.mean() - 0.9) < 5 * np.sqrt(0.9 * 0.1 / mask.size)


def test_masks_of_different_keys_are_independent():
  first = np.asarray(dropout.keep_mask(jax.random.key(1), (1000, 1000), 0.5))
  second = np.asarray(dropout.keep_mask(jax.random.key(2), (1000, 1000), 0.5))
  both = np.mean(first & second)
  assert abs(both - 0.25) < 5 * np.sqrt(0.25 * 0.75 / first.size)


def test_neighbouring_elements_are_uncorrelated():
  mask = np.asarray(dropout.keep_mask(jax.random.key(3), (2000, 500), 0.5)).astype(np.float64)
  flat = mask.ravel() - mask.mean()
  for lag in (1, 2, 500, 1024):
    correlation = np.mean(flat[:-lag] * flat[lag:]) / flat.var()
    assert abs(correlation) < 5 / np.sqrt(flat.size), lag


def test_mask_same_under_vmap():
  keys = jax.random.split(jax.random.key(4), 3)
  one_by_one = np.stack([np.asarray(dropout.keep_mask(k, (64, 32), 0.7)) for k in keys])
  vmapped = jax.jit(jax.vmap(lambda k: dropout.keep_mask(k, (64, 32), 0.7)))(keys)
  np.testing.assert_array_equal(one_by_one, np.asarray(vmapped))
  assert not np.array_equal(one_by_one[0], one_by_one[1])


def test_layer_scales_kept_values():
  layer = dropout.Dropout(0.25)
  x = jnp.ones((300, 300))
  dropped = np.asarray(layer.apply({}, x, deterministic=False,
                                   rngs={"dropout": jax.random.key(5)}))
  assert set(np.unique(dropped)) == {0.0, np.float32(1 / 0.75)}
  assert abs(dropped.mean() - 1.0) < 0.02


def test_layer_deterministic_is_identity():
  x = jnp.ones((30, 30))
  output = dropout.Dropout(0.25).apply({}, x, deterministic=True)
  np.testing.assert_array_equal(np.asarray(output), np.asarray(x))


@pytest.mark.parametrize("rate", [-0.1, 1.0])
def test_bad_rate_is_an_error(rate):
  with pytest.raises(ValueError, match="rate"):
    dropout.Dropout(rate).apply({}, jnp.ones(3), deterministic=False,
                                rngs={"dropout": jax.random.key(0)})
