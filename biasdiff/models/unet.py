"""Noise-predicting U-Net for DDPM on single-channel images, NHWC.

The network maps x_t [batch, H, W, C] and the integer time t [batch] to the
predicted noise eps_hat of the same shape as x_t. With base width w and
channel multipliers (m_0, m_1, …) the layout is:

  stem: Conv3x3 C -> w, pushed onto a skip stack
  encoder, level l at resolution H / 2^l with c_l = w m_l channels:
    blocks_per_resolution residual blocks (each output pushed), then, except
    at the last level, Down (each output pushed)
  bottleneck: RB(c_last, attention), RB(c_last)
  decoder, levels in reverse: blocks_per_resolution + 1 residual blocks, each
    on concat([h, pop()]) along channels with h first, then Up except at level 0
  head: GroupNorm -> SiLU -> Conv3x3 w -> C

At w = 32, multipliers (1, 2, 4), attention at resolutions 16 and 8 and 32 x 32
inputs this is the authors' 4,023,233-parameter network.
"""

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from biasdiff.models import initializers
from biasdiff.models.transformer import SelfAttention


def time_embedding_features(t: jax.Array, dim: int, max_period: float = 1e4) -> jax.Array:
  """Sinusoidal features of the raw time, sines first: [batch] -> [batch, dim].

  emb(t) = [sin(t f_0), …, sin(t f_{h-1}), cos(t f_0), …, cos(t f_{h-1})] with
  h = dim / 2 and f_k = exp(-ln(max_period) k / (h - 1)). The authors' code
  stores these features as a frozen table over t = 0 … 999. Computing them from
  t gives the same values, and neither form has trainable parameters.
  """
  half = dim // 2
  frequencies = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
  angles = t.astype(jnp.float32)[:, None] * frequencies[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def torch_conv(features: int, in_features: int, kernel_size: int, *, stride: int = 1,
               dtype: Any = None, name: Optional[str] = None) -> nn.Conv:
  """Return an nn.Conv initialised as PyTorch's Conv2d, with padding (k - 1) / 2 on every side.

  Weights and biases are U(+-1/sqrt(fan_in)) with fan_in = in_features k^2. The
  padding is explicit because Flax's "SAME" pads a stride-2 convolution
  asymmetrically, which shifts the sampling grid.
  """
  bound = initializers.fan_in_bound(in_features * kernel_size * kernel_size)
  pad = (kernel_size - 1) // 2
  return nn.Conv(
      features, (kernel_size, kernel_size), strides=(stride, stride),
      padding=((pad, pad), (pad, pad)), dtype=dtype, param_dtype=jnp.float32,
      kernel_init=initializers.uniform(bound), bias_init=initializers.uniform(bound), name=name)


def _group_norm(num_groups: int, epsilon: float, name: Optional[str] = None) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=jnp.float32,
                      use_fast_variance=False, name=name)


class ConvBlock(nn.Module):
  """GroupNorm over the input channels -> SiLU -> channel dropout -> Conv3x3.

  The dropout zeroes whole feature maps per sample (it is broadcast over the
  two spatial axes) and rescales the rest by 1 / (1 - rate).
  """

  features: int
  dropout_rate: float
  num_groups: int
  group_norm_eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    # x: [batch, height, width, in_channels]
    h = nn.silu(_group_norm(self.num_groups, self.group_norm_eps)(x))
    if self.dropout_rate > 0:
      h = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2))(h, deterministic=not train)
    return torch_conv(self.features, x.shape[-1], 3, dtype=self.dtype)(h).astype(jnp.float32)


class ResidualBlock(nn.Module):
  """Residual block with time conditioning and optional self-attention.

  h = ConvBlock(c_in -> c_out, no dropout)(x) + Dense(SiLU(tau)) broadcast over
  space, then h = ConvBlock(c_out -> c_out, dropout)(h) + skip(x), where skip is a
  1x1 convolution if c_in != c_out and the identity otherwise. With attention,
  h = h + MHA(GroupNorm(h)) over the H W positions, after the residual sum, with
  no attention dropout.
  """

  features: int
  attention: bool
  dropout_rate: float
  num_groups: int
  group_norm_eps: float
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, tau: jax.Array, train: bool) -> jax.Array:
    # x: [batch, height, width, c_in]; tau: [batch, time_width]
    in_features = x.shape[-1]
    for channels in (in_features, self.features):
      if channels % self.num_groups:
        raise ValueError(
            f"GroupNorm with {self.num_groups} groups needs channel counts divisible by "
            f"{self.num_groups}, got {channels}; change base_width or channel_multipliers.")

    h = ConvBlock(self.features, 0.0, self.num_groups, self.group_norm_eps, self.dtype,
                  name="conv_in")(x, train)
    time = initializers.torch_dense(self.features, tau.shape[-1], dtype=self.dtype,
                                    name="time_projection")(nn.silu(tau))
    h = h + time.astype(jnp.float32)[:, None, None, :]
    h = ConvBlock(self.features, self.dropout_rate, self.num_groups, self.group_norm_eps,
                  self.dtype, name="conv_out")(h, train)
    if in_features != self.features:
      skip = torch_conv(self.features, in_features, 1, dtype=self.dtype, name="skip")(x)
      x = skip.astype(jnp.float32)
    h = h + x

    if self.attention:
      if self.features % self.num_heads:
        raise ValueError(
            f"num_heads={self.num_heads} must divide the attention width {self.features}.")
      batch, height, width, channels = h.shape
      normed = _group_norm(self.num_groups, self.group_norm_eps, name="attention_norm")(h)
      tokens = normed.reshape(batch, height * width, channels)
      attended = SelfAttention(self.num_heads, dropout_rate=0.0, deterministic=True,
                               dtype=self.dtype, name="attention")(tokens)
      h = h + attended.astype(jnp.float32).reshape(batch, height, width, channels)
    return h


class UNet(nn.Module):
  """The eps-predicting U-Net; defaults are the authors' 32 x 32 network.

  Call as model.apply({"params": params}, x_t, t, train=bool,
  rngs={"dropout": key}) with x_t [batch, H, W, C] float and t [batch] int or
  float (0-based DDPM time). Returns eps_hat with the shape of x_t, float32.
  train=False disables dropout and needs no dropout key.

  H and W must be divisible by 2^(len(channel_multipliers) - 1), and every
  channel count by num_groups. dtype sets the matmul and convolution input
  dtype; parameters, normalisation and the output stay float32.
  """

  base_width: int = 32  # channels w at full resolution; the time embedding has 4 w
  channel_multipliers: Sequence[int] = (1, 2, 4)  # channels w m_l at level l
  blocks_per_resolution: int = 2  # encoder residual blocks per level
  attention_resolutions: Sequence[int] = (16, 8)  # feature-map sizes (pixels) with attention
  mid_attention: bool = True  # attention in the first bottleneck block
  dropout_rate: float = 0.1  # channel dropout in each residual block's second conv
  num_groups: int = 8  # GroupNorm groups
  group_norm_eps: float = 1e-5
  num_heads: int = 4
  dtype: Any = jnp.float32  # matmul and convolution input dtype

  def _check_config(self, height: int, width: int) -> None:
    # The time features divide by h - 1 with h = base_width / 2, so base_width >= 4.
    if self.base_width < 4 or self.base_width % 2:
      raise ValueError(f"base_width must be an even number >= 4, got {self.base_width}.")
    if not self.channel_multipliers or any(m < 1 for m in self.channel_multipliers):
      raise ValueError(
          f"channel_multipliers must be a non-empty list of positive ints, got "
          f"{self.channel_multipliers}.")
    if self.blocks_per_resolution < 1:
      raise ValueError(f"blocks_per_resolution must be at least 1, got {self.blocks_per_resolution}.")
    factor = 2 ** (len(self.channel_multipliers) - 1)
    if height % factor or width % factor:
      raise ValueError(
          f"Image size {height}x{width} must be divisible by {factor} for "
          f"{len(self.channel_multipliers)} resolution levels.")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"dropout_rate must lie in [0, 1), got {self.dropout_rate}.")

  @nn.compact
  def __call__(self, x_t: jax.Array, t: jax.Array, train: bool = False) -> jax.Array:
    # x_t: [batch, height, width, channels]; t: [batch]
    x_t = jnp.asarray(x_t)
    t = jnp.asarray(t)
    if x_t.ndim != 4:
      raise ValueError(f"x_t has shape {x_t.shape}, expected [batch, height, width, channels].")
    if t.ndim == 0:
      t = jnp.broadcast_to(t, x_t.shape[:1])
    if t.shape != x_t.shape[:1]:
      raise ValueError(f"t has shape {t.shape}, expected one time per sample: ({x_t.shape[0]},).")
    batch, height, width, in_channels = x_t.shape
    self._check_config(height, width)
    base = self.base_width
    num_levels = len(self.channel_multipliers)

    def residual_block(features, attention, name):
      return ResidualBlock(features, attention, self.dropout_rate, self.num_groups,
                           self.group_norm_eps, self.num_heads, self.dtype, name=name)

    # [batch, 4 w]
    tau = time_embedding_features(t, base)
    tau = initializers.torch_dense(4 * base, base, dtype=self.dtype, name="time_dense_0")(tau)
    tau = nn.gelu(tau.astype(jnp.float32), approximate=False)
    tau = initializers.torch_dense(4 * base, 4 * base, dtype=self.dtype, name="time_dense_1")(tau)
    tau = tau.astype(jnp.float32)

    h = torch_conv(base, in_channels, 3, dtype=self.dtype, name="stem")(x_t.astype(jnp.float32))
    h = h.astype(jnp.float32)
    skips = [h]
    for level, multiplier in enumerate(self.channel_multipliers):
      features = base * multiplier
      attention = (height >> level) in self.attention_resolutions
      for block in range(self.blocks_per_resolution):
        h = residual_block(features, attention, f"down_{level}_block_{block}")(h, tau, train)
        skips.append(h)
      if level != num_levels - 1:
        h = torch_conv(features, features, 3, stride=2, dtype=self.dtype,
                       name=f"down_{level}_downsample")(h).astype(jnp.float32)
        skips.append(h)

    features = base * self.channel_multipliers[-1]
    h = residual_block(features, self.mid_attention, "mid_block_0")(h, tau, train)
    h = residual_block(features, False, "mid_block_1")(h, tau, train)

    for level in reversed(range(num_levels)):
      features = base * self.channel_multipliers[level]
      attention = (height >> level) in self.attention_resolutions
      for block in range(self.blocks_per_resolution + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = residual_block(features, attention, f"up_{level}_block_{block}")(h, tau, train)
      if level != 0:
        # Nearest-neighbour x2, then Conv3x3.
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
        h = torch_conv(features, features, 3, dtype=self.dtype,
                       name=f"up_{level}_upsample")(h).astype(jnp.float32)

    h = nn.silu(_group_norm(self.num_groups, self.group_norm_eps, name="head_norm")(h))
    eps_hat = torch_conv(in_channels, base, 3, dtype=self.dtype, name="head")(h)
    return eps_hat.astype(jnp.float32)


def digits_unet(**overrides) -> UNet:
  """Return the small U-Net for 8 x 8 handwritten digits (159,697 parameters).

  Width 16, resolutions 8 and 4 (multipliers (1, 2)), one residual block per
  resolution and no attention, so that a pair trains on a CPU. Keyword
  arguments override any attribute.
  """
  config = dict(base_width=16, channel_multipliers=(1, 2), blocks_per_resolution=1,
                attention_resolutions=(), mid_attention=False)
  config.update(overrides)
  return UNet(**config)
