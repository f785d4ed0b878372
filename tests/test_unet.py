"""Tests for the eps-predicting U-Net: sizes, layout, pieces, dropout and a golden value."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from biasdiff import models
from biasdiff.models import unet

# A small network that still has attention (at 8 x 8) and two levels.
TINY = dict(base_width=8, channel_multipliers=(1, 2), blocks_per_resolution=1,
            attention_resolutions=(8,))
TINY_SHAPE = (2, 16, 16, 1)


@functools.lru_cache(maxsize=None)
def _tiny():
  model = unet.UNet(**TINY)
  params = models.init_params(model, jax.random.key(0), TINY_SHAPE)
  apply = jax.jit(model.apply, static_argnames="train")
  return model, params, apply


def _tiny_inputs():
  x_t = jax.random.normal(jax.random.key(1), TINY_SHAPE)
  t = jnp.array([0, 500])
  return x_t, t


def _count(model, shape):
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), shape))
  return models.count_params(shapes)


@pytest.mark.parametrize("width, expected", [(8, 255_089), (16, 1_010_657), (32, 4_023_233),
                                             (64, 16_054_145)])
def test_parameter_count_at_32x32(width, expected):
  assert _count(unet.UNet(base_width=width), (2, 32, 32, 1)) == expected


def test_digits_parameter_count():
  assert _count(unet.digits_unet(), (2, 8, 8, 1)) == 159_697


def test_decoder_channel_layout():
  shapes = jax.eval_shape(lambda: models.init_params(unet.UNet(), jax.random.key(0),
                                                     (2, 32, 32, 1)))
  # (block, input channels, output channels) of the first convolution.
  expected = {
      "down_0_block_0": (32, 32), "down_1_block_0": (32, 64), "down_2_block_1": (128, 128),
      "mid_block_0": (128, 128), "mid_block_1": (128, 128),
      "up_2_block_0": (256, 128), "up_2_block_1": (256, 128), "up_2_block_2": (192, 128),
      "up_1_block_0": (192, 64), "up_1_block_1": (128, 64), "up_1_block_2": (96, 64),
      "up_0_block_0": (96, 32), "up_0_block_1": (64, 32), "up_0_block_2": (64, 32),
  }
  for block, (c_in, c_out) in expected.items():
    kernel = shapes[block]["conv_in"]["Conv_0"]["kernel"]
    assert kernel.shape == (3, 3, c_in, c_out), block
  with_attention = {name for name in shapes if "attention" in shapes[name]}
  assert with_attention == {
      "down_1_block_0", "down_1_block_1", "down_2_block_0", "down_2_block_1", "mid_block_0",
      "up_2_block_0", "up_2_block_1", "up_2_block_2",
      "up_1_block_0", "up_1_block_1", "up_1_block_2",
  }
  assert shapes["down_0_downsample"]["kernel"].shape == (3, 3, 32, 32)
  assert shapes["up_1_upsample"]["kernel"].shape == (3, 3, 64, 64)
  assert shapes["head"]["kernel"].shape == (3, 3, 32, 1)
  assert shapes["time_dense_0"]["kernel"].shape == (32, 128)
  assert shapes["time_dense_1"]["kernel"].shape == (128, 128)


def test_output_shape_and_dtype():
  model, params, apply = _tiny()
  x_t, t = _tiny_inputs()
  eps_hat = apply({"params": params}, x_t, t)
  assert eps_hat.shape == x_t.shape
  assert eps_hat.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(eps_hat)))


def test_golden_output():
  _, params, apply = _tiny()
  x_t, t = _tiny_inputs()
  eps_hat = np.asarray(apply({"params": params}, x_t, t))
  message = ("U-Net output changed. Update these golden numbers only after an intended "
             "change to the architecture, its initialisation or the test inputs.")
  np.testing.assert_allclose(eps_hat.sum(), -23.748186, rtol=1e-4, err_msg=message)
  np.testing.assert_allclose(np.abs(eps_hat).sum(), 110.53122, rtol=1e-4, err_msg=message)
  np.testing.assert_allclose(
      [eps_hat[0, 0, 0, 0], eps_hat[1, 5, 7, 0], eps_hat[0, 15, 15, 0]],
      [-0.21082428, 0.033541705, 0.024527673], rtol=1e-4, atol=1e-6, err_msg=message)


def test_eval_mode_is_deterministic():
  _, params, apply = _tiny()
  x_t, t = _tiny_inputs()
  plain = apply({"params": params}, x_t, t, train=False)
  with_key = apply({"params": params}, x_t, t, train=False, rngs={"dropout": jax.random.key(3)})
  np.testing.assert_array_equal(plain, with_key)


def test_train_mode_applies_dropout():
  _, params, apply = _tiny()
  x_t, t = _tiny_inputs()
  plain = apply({"params": params}, x_t, t, train=False)
  first = apply({"params": params}, x_t, t, train=True, rngs={"dropout": jax.random.key(3)})
  again = apply({"params": params}, x_t, t, train=True, rngs={"dropout": jax.random.key(3)})
  np.testing.assert_array_equal(first, again)
  assert float(jnp.abs(first - plain).max()) > 1e-3


def test_dropout_zeroes_whole_feature_maps():
  model, params, _ = _tiny()
  x_t, t = _tiny_inputs()

  @jax.jit
  def dropout_outputs(params):
    _, state = model.apply({"params": params}, x_t, t, train=True,
                           rngs={"dropout": jax.random.key(3)},
                           capture_intermediates=lambda module, _: isinstance(module, nn.Dropout),
                           mutable=["intermediates"])
    return {name: block["conv_out"] for name, block in state["intermediates"].items()}

  outputs = jax.tree.leaves(dropout_outputs(params))
  # One per residual block: 2 in the encoder, 2 in the bottleneck, 4 in the decoder.
  assert len(outputs) == 8
  dropped_any = False
  for output in outputs:
    output = np.asarray(output)  # [batch, height, width, channels]
    zero = output == 0
    all_zero = zero.all(axis=(1, 2))
    # A map is either dropped entirely or kept (a kept map is almost surely non-zero).
    assert np.array_equal(zero.any(axis=(1, 2)), all_zero)
    dropped_any |= bool(all_zero.any())
  assert dropped_any


def test_time_features_sines_first():
  features = unet.time_embedding_features(jnp.array([0, 7]), 8)
  assert features.shape == (2, 8)
  np.testing.assert_array_equal(features[0, :4], np.zeros(4))
  np.testing.assert_array_equal(features[0, 4:], np.ones(4))
  # h = 4 frequencies with h - 1 = 3 in the denominator: 1, 1e4^(-1/3), 1e4^(-2/3), 1e-4.
  frequencies = np.exp(-np.log(1e4) * np.arange(4) / 3)
  np.testing.assert_allclose(frequencies[-1], 1e-4)
  np.testing.assert_allclose(features[1, :4], np.sin(7 * frequencies), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(features[1, 4:], np.cos(7 * frequencies), rtol=1e-6, atol=1e-6)


def test_time_mlp_uses_exact_gelu():
  model, params, _ = _tiny()
  x_t, t = _tiny_inputs()

  @jax.jit
  def time_layers(params):
    _, state = model.apply(
        {"params": params}, x_t, t,
        capture_intermediates=lambda module, _: module.name in ("time_dense_0", "time_dense_1"),
        mutable=["intermediates"])
    return state["intermediates"]

  captured = time_layers(params)
  hidden = np.asarray(captured["time_dense_0"]["__call__"][0], np.float64)
  tau = np.asarray(captured["time_dense_1"]["__call__"][0], np.float64)
  kernel = np.asarray(params["time_dense_1"]["kernel"], np.float64)
  bias = np.asarray(params["time_dense_1"]["bias"], np.float64)
  exact = 0.5 * hidden * (1.0 + scipy.special.erf(hidden / math.sqrt(2.0)))
  np.testing.assert_allclose(tau, exact @ kernel + bias, rtol=1e-6, atol=1e-6)
  # The tanh approximation (Flax's default) differs by up to 4.7e-4 per unit,
  # enough for the check above to tell the two apart on these inputs.
  tanh_form = 0.5 * hidden * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (hidden + 0.044715 * hidden**3)))
  assert np.abs(tau - (tanh_form @ kernel + bias)).max() > 1e-5


def test_downsample_pads_one_on_every_side():
  conv = unet.torch_conv(1, 1, 3, stride=2)
  x = jax.random.normal(jax.random.key(0), (1, 6, 6, 1))
  params = conv.init(jax.random.key(1), x)
  out = np.asarray(conv.apply(params, x))
  assert out.shape == (1, 3, 3, 1)
  kernel = np.asarray(params["params"]["kernel"])[:, :, 0, 0]
  bias = float(params["params"]["bias"][0])
  padded = np.pad(np.asarray(x)[0, :, :, 0], 1)
  for i in range(3):
    for j in range(3):
      expected = (padded[2 * i:2 * i + 3, 2 * j:2 * j + 3] * kernel).sum() + bias
      assert out[0, i, j, 0] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def _check_uniform(values, bound, name):
  values = np.asarray(values).ravel()
  assert np.abs(values).max() <= bound, name
  if values.size >= 1000:
    # Large draws fill the interval, and U(-b, b) has standard deviation b / sqrt(3).
    assert np.abs(values).max() > 0.99 * bound, name
    assert values.std() == pytest.approx(bound / math.sqrt(3), rel=0.05), name


def test_init_matches_pytorch_defaults():
  _, params, _ = _tiny()
  _check_uniform(params["stem"]["kernel"], 1 / math.sqrt(9), "stem kernel")
  _check_uniform(params["stem"]["bias"], 1 / math.sqrt(9), "stem bias")
  block = params["up_1_block_0"]  # 16 + 16 input channels, 16 output channels
  _check_uniform(block["conv_in"]["Conv_0"]["kernel"], 1 / math.sqrt(32 * 9), "conv_in kernel")
  _check_uniform(block["conv_in"]["Conv_0"]["bias"], 1 / math.sqrt(32 * 9), "conv_in bias")
  _check_uniform(block["conv_out"]["Conv_0"]["kernel"], 1 / math.sqrt(16 * 9), "conv_out kernel")
  _check_uniform(block["skip"]["kernel"], 1 / math.sqrt(32), "skip kernel")
  _check_uniform(block["time_projection"]["kernel"], 1 / math.sqrt(32), "time kernel")
  np.testing.assert_array_equal(block["conv_in"]["GroupNorm_0"]["scale"], 1.0)
  np.testing.assert_array_equal(block["conv_in"]["GroupNorm_0"]["bias"], 0.0)
  attention = params["down_1_block_0"]["attention"]  # 16 channels
  _check_uniform(attention["qkv"]["kernel"], math.sqrt(6 / (4 * 16)), "qkv kernel")
  np.testing.assert_array_equal(attention["qkv"]["bias"], 0.0)
  _check_uniform(attention["out"]["kernel"], 1 / math.sqrt(16), "out kernel")
  np.testing.assert_array_equal(attention["out"]["bias"], 0.0)
  np.testing.assert_array_equal(params["head_norm"]["scale"], 1.0)
  np.testing.assert_array_equal(params["head_norm"]["bias"], 0.0)


def test_rejects_bad_input():
  model, params, _ = _tiny()
  with pytest.raises(ValueError, match="divisible by 2"):
    model.apply({"params": params}, jnp.zeros((1, 9, 9, 1)), jnp.array([3]))
  with pytest.raises(ValueError, match="one time per sample"):
    model.apply({"params": params}, jnp.zeros((2, 16, 16, 1)), jnp.array([3]))
  with pytest.raises(ValueError, match="divisible by 8"):
    models.init_params(unet.UNet(base_width=12), jax.random.key(0), (1, 32, 32, 1))
