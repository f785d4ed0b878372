"""Tests for the x_0-predicting transformer: size, forward pass, dropout and init."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biasdiff.models import initializers
from biasdiff.models import transformer

SMALL = dict(d_model=32, num_layers=2, num_heads=4, ffn_dim=64)


def _small_model(**overrides):
  return transformer.Transformer(**{**SMALL, **overrides})


@functools.lru_cache(maxsize=None)
def _small_params():
  return initializers.init_params(_small_model(), jax.random.key(0), (3, 16, 6))


@functools.lru_cache(maxsize=None)
def _jitted_apply(model):
  return jax.jit(model.apply, static_argnames="train")


def _inputs(batch=3, seed=1):
  x_t = jax.random.normal(jax.random.key(seed), (batch, 16, 6))
  t = jnp.array([1, 75, 500, 3, 250][:batch])
  return x_t, t


def _layer_norm(x, scale, bias, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  variance = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(variance + eps) * scale + bias


def _reference_forward(params, x_t, t, num_heads):
  """Float64 numpy forward pass written from the architecture description."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x_t = np.asarray(x_t, np.float64)
  t = np.asarray(t, np.float64)

  frequencies = np.exp(-math.log(1e4) * np.arange(16) / 16)
  angles = t[:, None] * frequencies
  tau = np.concatenate([np.cos(angles), np.sin(angles)], axis=-1)
  h = (x_t @ p["token_embedding"]["kernel"] + p["token_embedding"]["bias"]
       + p["position_embedding"][None]
       + (tau @ p["time_embedding"]["kernel"] + p["time_embedding"]["bias"])[:, None, :])

  layers = p["layers"]
  num_layers = layers["ffn_in"]["kernel"].shape[0]
  batch, length, d_model = h.shape
  head_dim = d_model // num_heads
  for i in range(num_layers):
    layer = jax.tree.map(lambda a, i=i: a[i], layers)
    qkv = h @ layer["attention"]["qkv"]["kernel"] + layer["attention"]["qkv"]["bias"]
    q, k, v = np.split(qkv, 3, axis=-1)
    split = lambda a: a.reshape(batch, length, num_heads, head_dim).transpose(0, 2, 1, 3)
    q, k, v = split(q), split(k), split(v)

    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    scores /= scores.sum(-1, keepdims=True)
    attended = (scores @ v).transpose(0, 2, 1, 3).reshape(batch, length, d_model)
    attended = attended @ layer["attention"]["out"]["kernel"] + layer["attention"]["out"]["bias"]
    h = _layer_norm(h + attended, layer["attention_norm"]["scale"], layer["attention_norm"]["bias"])

    hidden = np.maximum(h @ layer["ffn_in"]["kernel"] + layer["ffn_in"]["bias"], 0.0)
    ffn = hidden @ layer["ffn_out"]["kernel"] + layer["ffn_out"]["bias"]
    h = _layer_norm(h + ffn, layer["ffn_norm"]["scale"], layer["ffn_norm"]["bias"])

  return h @ p["logits"]["kernel"] + p["logits"]["bias"]


def test_paper_size_parameter_count():
  model = transformer.Transformer()
  shapes = jax.eval_shape(lambda: initializers.init_params(model, jax.random.key(0), (2, 16, 6)))
  assert initializers.count_params(shapes) == 16_854_022


def test_small_tier_parameter_count():
  # d = 256, 4 layers, 4 heads, FFN 512: about 2.1M parameters.
  model = transformer.Transformer(d_model=256, num_layers=4, num_heads=4, ffn_dim=512)
  shapes = jax.eval_shape(lambda: initializers.init_params(model, jax.random.key(0), (2, 16, 6)))
  per_layer = 3 * 256 * 256 + 3 * 256 + 256 * 256 + 256 + 2 * 256 * 512 + 512 + 256 + 4 * 256
  expected = 6 * 256 + 256 + 16 * 256 + 32 * 256 + 256 + 4 * per_layer + 256 * 6 + 6
  assert initializers.count_params(shapes) == expected


def test_output_shape_and_dtype():
  model = _small_model()
  x_t, t = _inputs()
  params = _small_params()
  logits = _jitted_apply(model)({"params": params}, x_t, t)
  assert logits.shape == (3, 16, 6)
  assert logits.dtype == jnp.float32


def test_forward_matches_numpy_reference():
  model = _small_model()
  x_t, t = _inputs()
  params = _small_params()
  with jax.default_matmul_precision("highest"):
    logits = _jitted_apply(model)({"params": params}, x_t, t)
  expected = _reference_forward(params, x_t, t, num_heads=4)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_float_time_equals_integer_time():
  model = _small_model()
  x_t, t = _inputs()
  params = _small_params()
  from_int = _jitted_apply(model)({"params": params}, x_t, t)
  from_float = _jitted_apply(model)({"params": params}, x_t, t.astype(jnp.float32))
  np.testing.assert_array_equal(from_int, from_float)


def test_time_features_cosines_first():
  features = transformer.time_features(jnp.array([0, 3]), dim=32)
  assert features.shape == (2, 32)
  np.testing.assert_array_equal(features[0, :16], np.ones(16))
  np.testing.assert_array_equal(features[0, 16:], np.zeros(16))
  frequencies = np.exp(-np.log(1e4) * np.arange(16) / 16)
  np.testing.assert_allclose(features[1, :16], np.cos(3 * frequencies), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(features[1, 16:], np.sin(3 * frequencies), rtol=1e-6, atol=1e-6)


def test_eval_mode_is_deterministic():
  model = _small_model()
  x_t, t = _inputs()
  params = _small_params()
  apply = _jitted_apply(model)
  plain = apply({"params": params}, x_t, t, train=False)
  with_key = apply({"params": params}, x_t, t, train=False, rngs={"dropout": jax.random.key(5)})
  np.testing.assert_array_equal(plain, with_key)


def test_train_mode_applies_dropout():
  apply = _jitted_apply(_small_model())
  x_t, t = _inputs()
  params = _small_params()
  plain = apply({"params": params}, x_t, t, train=False)
  first = apply({"params": params}, x_t, t, train=True, rngs={"dropout": jax.random.key(5)})
  again = apply({"params": params}, x_t, t, train=True, rngs={"dropout": jax.random.key(5)})
  other = apply({"params": params}, x_t, t, train=True, rngs={"dropout": jax.random.key(6)})
  np.testing.assert_array_equal(first, again)
  assert np.abs(np.asarray(first - plain)).max() > 1e-2
  assert np.abs(np.asarray(first - other)).max() > 1e-2
  no_dropout = _small_model(dropout_rate=0.0)
  unchanged = _jitted_apply(no_dropout)({"params": params}, x_t, t, train=True,
                               rngs={"dropout": jax.random.key(5)})
  np.testing.assert_allclose(unchanged, plain, rtol=1e-6, atol=1e-6)


def test_train_mode_requires_dropout_key():
  model = _small_model()
  x_t, t = _inputs()
  params = _small_params()
  with pytest.raises(Exception, match="dropout"):
    _jitted_apply(model)({"params": params}, x_t, t, train=True)


def test_layers_independent_by_default():
  params = initializers.init_params(_small_model(num_layers=3), jax.random.key(0), (2, 16, 6))
  for leaf in jax.tree.leaves(params["layers"]):
    if np.asarray(leaf).std() > 0:  # LayerNorm scales and zero biases are constant
      assert not np.array_equal(leaf[0], leaf[1])
      assert not np.array_equal(leaf[1], leaf[2])


def test_tie_initial_layers_copies_layer_zero():
  params = initializers.init_params(_small_model(num_layers=3, tie_initial_layers=True),
                                    jax.random.key(0), (2, 16, 6))
  for leaf in jax.tree.leaves(params["layers"]):
    np.testing.assert_array_equal(leaf[1], leaf[0])
    np.testing.assert_array_equal(leaf[2], leaf[0])


def _check_uniform(values, bound, name):
  values = np.asarray(values).ravel()
  assert np.abs(values).max() <= bound, name
  if values.size >= 1000:
    # Large draws fill the interval, and U(-b, b) has standard deviation b / sqrt(3).
    assert np.abs(values).max() > 0.99 * bound, name
    assert values.std() == pytest.approx(bound / math.sqrt(3), rel=0.05), name


def test_init_matches_pytorch_defaults():
  d, ffn = 64, 128
  model = transformer.Transformer(d_model=d, num_layers=2, num_heads=4, ffn_dim=ffn)
  params = initializers.init_params(model, jax.random.key(3), (2, 16, 6))
  _check_uniform(params["token_embedding"]["kernel"], 1 / math.sqrt(6), "token kernel")
  _check_uniform(params["token_embedding"]["bias"], 1 / math.sqrt(6), "token bias")
  _check_uniform(params["time_embedding"]["kernel"], 1 / math.sqrt(32), "time kernel")
  _check_uniform(params["time_embedding"]["bias"], 1 / math.sqrt(32), "time bias")
  _check_uniform(params["logits"]["kernel"], 1 / math.sqrt(d), "logits kernel")
  _check_uniform(params["logits"]["bias"], 1 / math.sqrt(d), "logits bias")
  positions = np.asarray(params["position_embedding"])
  assert positions.shape == (16, d)
  assert positions.std() == pytest.approx(1.0, rel=0.1)
  assert abs(positions.mean()) < 0.1

  layers = params["layers"]
  _check_uniform(layers["attention"]["qkv"]["kernel"], math.sqrt(6 / (4 * d)), "qkv kernel")
  np.testing.assert_array_equal(layers["attention"]["qkv"]["bias"], 0.0)
  _check_uniform(layers["attention"]["out"]["kernel"], 1 / math.sqrt(d), "out kernel")
  np.testing.assert_array_equal(layers["attention"]["out"]["bias"], 0.0)
  _check_uniform(layers["ffn_in"]["kernel"], 1 / math.sqrt(d), "ffn_in kernel")
  _check_uniform(layers["ffn_in"]["bias"], 1 / math.sqrt(d), "ffn_in bias")
  _check_uniform(layers["ffn_out"]["kernel"], 1 / math.sqrt(ffn), "ffn_out kernel")
  _check_uniform(layers["ffn_out"]["bias"], 1 / math.sqrt(ffn), "ffn_out bias")
  for norm in ("attention_norm", "ffn_norm"):
    np.testing.assert_array_equal(layers[norm]["scale"], 1.0)
    np.testing.assert_array_equal(layers[norm]["bias"], 0.0)


def test_bfloat16_mode_keeps_float32_params_and_logits():
  x_t, t = _inputs()
  params = _small_params()
  reference = _jitted_apply(_small_model())({"params": params}, x_t, t)
  bf16_model = _small_model(dtype=jnp.bfloat16)
  bf16_params = initializers.init_params(bf16_model, jax.random.key(0), x_t.shape)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(bf16_params))
  logits = _jitted_apply(bf16_model)({"params": params}, x_t, t)
  assert logits.dtype == jnp.float32
  scale = float(jnp.abs(reference).max())
  assert float(jnp.abs(logits - reference).max()) < 0.05 * scale
  assert float(jnp.abs(logits - reference).max()) > 0.0


def test_rejects_bad_shapes_and_config():
  model = _small_model()
  params = initializers.init_params(model, jax.random.key(0), (2, 16, 6))
  with pytest.raises(ValueError, match="x_t has shape"):
    _jitted_apply(model)({"params": params}, jnp.zeros((2, 8, 6)), jnp.array([1, 2]))
  with pytest.raises(ValueError, match="one time per sample"):
    _jitted_apply(model)({"params": params}, jnp.zeros((2, 16, 6)), jnp.array([1, 2, 3]))
  with pytest.raises(ValueError, match="must divide"):
    initializers.init_params(_small_model(num_heads=5), jax.random.key(0), (2, 16, 6))


def test_scalar_time_broadcasts():
  model = _small_model()
  x_t, _ = _inputs()
  params = initializers.init_params(model, jax.random.key(0), x_t.shape)
  scalar = _jitted_apply(model)({"params": params}, x_t, jnp.array(42))
  per_sample = _jitted_apply(model)({"params": params}, x_t, jnp.full((3,), 42))
  np.testing.assert_array_equal(scalar, per_sample)
