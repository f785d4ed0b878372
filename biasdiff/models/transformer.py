"""Encoder-only transformer that predicts x_0 logits from noisy one-hot sequences.

The network maps x_t [batch, L, q] and the integer diffusion time t [batch] to
logits [batch, L, q]; their softmax over the last axis is the x_0 prediction.

  h = Dense(q -> d)(x_t) + P + Dense(32 -> d)(tau(t))      (P: learned [L, d] table)
  repeat N times (post-norm):
    h = LN(h + Drop(MHA(h)))
    h = LN(h + Drop(W2 Drop(ReLU(W1 h + b1)) + b2))
  logits = Dense(d -> q)(h)                                (no final LayerNorm)

tau(t) has 32 sinusoidal channels of the raw integer t, cosines first, with
frequencies f_i = exp(-ln(1e4) i / 16). Dropout acts on the attention
probabilities, the attention output, after the ReLU and on the FFN output,
only when train=True, with masks from the keyed hash of models/dropout.py.
LayerNorm uses eps = 1e-5.

At the paper size (d = 512, 8 layers, 4 heads, FFN 1024, q = 6, L = 16) the
network has 16,854,022 trainable parameters.
"""

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from biasdiff.models import dropout as dropout_lib
from biasdiff.models import initializers


def time_features(t: jax.Array, dim: int = 32, max_period: float = 1e4) -> jax.Array:
  """Sinusoidal features of the raw time, cosines first: [batch] -> [batch, dim].

  tau(t) = [cos(t f_0), …, cos(t f_{h-1}), sin(t f_0), …, sin(t f_{h-1})] with
  h = dim / 2 and f_i = exp(-ln(max_period) i / h).
  """
  half = dim // 2
  frequencies = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = t.astype(jnp.float32)[:, None] * frequencies[None, :]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class SelfAttention(nn.Module):
  """Multi-head self-attention with PyTorch's nn.MultiheadAttention layout and init.

  One packed Dense(d -> 3d) gives q, k and v (Xavier-uniform over the packed
  matrix, zero bias); each head has dimension d / heads and scale
  1 / sqrt(d / heads). Dropout applies to the attention probabilities. The
  output projection has a U(+-1/sqrt(d)) kernel and a zero bias.
  """

  num_heads: int
  dropout_rate: float
  deterministic: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    # h: [batch, length, d]
    batch, length, d_model = h.shape
    head_dim = d_model // self.num_heads
    qkv = initializers.torch_dense(
        3 * d_model, d_model, dtype=self.dtype, zero_bias=True,
        kernel_bound=initializers.packed_qkv_bound(d_model), name="qkv")(h)
    # [batch, length, 3, heads, head_dim]
    qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim)
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    # [batch, heads, length, length], accumulated and normalised in float32.
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
    probabilities = jax.nn.softmax(logits / math.sqrt(head_dim), axis=-1)
    probabilities = dropout_lib.Dropout(self.dropout_rate)(
        probabilities, deterministic=self.deterministic)
    attended = jnp.einsum("bhqk,bkhd->bqhd", probabilities.astype(value.dtype), value,
                          preferred_element_type=jnp.float32)
    attended = attended.reshape(batch, length, d_model)
    return initializers.torch_dense(d_model, d_model, dtype=self.dtype, zero_bias=True,
                                    name="out")(attended)


class EncoderLayer(nn.Module):
  """One post-norm encoder layer, written as a scan body (carry, unused) -> (carry, None)."""

  num_heads: int
  ffn_dim: int
  dropout_rate: float
  layer_norm_eps: float
  deterministic: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, unused: Any) -> tuple[jax.Array, None]:
    # h: [batch, length, d], float32 residual stream.
    d_model = h.shape[-1]

    def dropout(x):
      return dropout_lib.Dropout(self.dropout_rate)(x, deterministic=self.deterministic)

    def layer_norm(name):
      return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=jnp.float32,
                          use_fast_variance=False, name=name)

    attended = SelfAttention(self.num_heads, self.dropout_rate, self.deterministic,
                             dtype=self.dtype, name="attention")(h)
    h = layer_norm("attention_norm")(h + dropout(attended.astype(jnp.float32)))

    hidden = initializers.torch_dense(self.ffn_dim, d_model, dtype=self.dtype, name="ffn_in")(h)
    hidden = dropout(nn.relu(hidden))
    ffn_out = initializers.torch_dense(d_model, self.ffn_dim, dtype=self.dtype,
                                       name="ffn_out")(hidden)
    h = layer_norm("ffn_norm")(h + dropout(ffn_out.astype(jnp.float32)))
    return h, None


class Transformer(nn.Module):
  """The x_0-predicting denoiser for one-hot sequences; defaults are the paper size.

  Call as model.apply({"params": params}, x_t, t, train=bool,
  rngs={"dropout": key}) with x_t [batch, length, num_symbols] float and t
  [batch] int or float (the same 1-based t used for noising). Returns float32
  logits [batch, length, num_symbols]. train=False disables dropout and needs
  no dropout key.

  The layers are one `nn.scan`, so their parameters carry a leading
  [num_layers] axis under "layers". Layers are initialised independently;
  tie_initial_layers=True gives every layer the same initial parameters, as the
  authors' code does by deep-copying one layer.

  dtype sets the matmul input dtype (for example jnp.bfloat16). Parameters,
  the residual stream, LayerNorm, softmax and the returned logits stay float32.

  unroll_layers unrolls the layer scan in the compiled program (the parameter
  layout is the same either way). The default unrolls on CPU only: there,
  XLA runs the scanned layers about twice as slowly as unrolled ones (the
  2-layer, width-64 training step, jax 0.10.2), while accelerators keep the
  rolled loop, which compiles faster for deep networks.
  """

  num_symbols: int = 6  # alphabet size q
  length: int = 16  # sequence length L, the size of the positional table
  d_model: int = 512  # width d of the residual stream
  num_layers: int = 8
  num_heads: int = 4  # must divide d_model
  ffn_dim: int = 1024  # hidden width of the feed-forward block
  time_dim: int = 32  # number of sinusoidal time channels, even
  dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-5
  tie_initial_layers: bool = False
  dtype: Any = jnp.float32  # matmul input dtype
  unroll_layers: Optional[bool] = None  # None: unroll on CPU only

  def _check_config(self) -> None:
    if self.d_model % self.num_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must divide d_model={self.d_model}.")
    if self.time_dim < 2 or self.time_dim % 2:
      raise ValueError(f"time_dim must be a positive even number, got {self.time_dim}.")
    if self.num_layers < 1:
      raise ValueError(f"num_layers must be at least 1, got {self.num_layers}.")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"dropout_rate must lie in [0, 1), got {self.dropout_rate}.")

  def _unrolled(self) -> bool:
    if self.unroll_layers is None:
      return jax.default_backend() == "cpu"
    return self.unroll_layers

  @nn.compact
  def __call__(self, x_t: jax.Array, t: jax.Array, train: bool = False) -> jax.Array:
    # x_t: [batch, length, q]; t: [batch]
    self._check_config()
    x_t = jnp.asarray(x_t)
    t = jnp.asarray(t)
    expected = ("batch", self.length, self.num_symbols)
    if x_t.ndim != 3 or x_t.shape[1:] != expected[1:]:
      raise ValueError(f"x_t has shape {x_t.shape}, expected {expected}.")
    if t.ndim == 0:
      t = jnp.broadcast_to(t, x_t.shape[:1])
    if t.shape != x_t.shape[:1]:
      raise ValueError(f"t has shape {t.shape}, expected one time per sample: ({x_t.shape[0]},).")

    tokens = initializers.torch_dense(self.d_model, self.num_symbols, dtype=self.dtype,
                                      name="token_embedding")(x_t.astype(jnp.float32))
    positions = self.param("position_embedding", nn.initializers.normal(stddev=1.0),
                           (self.length, self.d_model), jnp.float32)
    times = initializers.torch_dense(self.d_model, self.time_dim, dtype=self.dtype,
                                     name="time_embedding")(time_features(t, self.time_dim))
    # [batch, length, d]
    h = tokens.astype(jnp.float32) + positions[None] + times.astype(jnp.float32)[:, None, :]

    layers = nn.scan(
        EncoderLayer,
        variable_axes={"params": 0},
        split_rngs={"params": not self.tie_initial_layers, "dropout": True},
        length=self.num_layers,
        unroll=self.num_layers if self._unrolled() else 1)
    h, _ = layers(self.num_heads, self.ffn_dim, self.dropout_rate, self.layer_norm_eps,
                  deterministic=not train, dtype=self.dtype, name="layers")(h, None)

    logits = initializers.torch_dense(self.num_symbols, self.d_model, dtype=self.dtype,
                                      name="logits")(h)
    return logits.astype(jnp.float32)
