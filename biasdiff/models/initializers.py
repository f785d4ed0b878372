"""PyTorch-default parameter initialisation for Flax layers, and a shared init helper.

The authors' networks use PyTorch's default initialisation. Flax's defaults
(lecun-normal kernels, zero biases) differ and would change early training
dynamics. PyTorch's Linear and Conv layers draw weights with kaiming-uniform,
a = sqrt(5), whose bound sqrt(6 / ((1 + a^2) fan_in)) equals 1 / sqrt(fan_in),
and biases from U(+-1/sqrt(fan_in)). Its MultiheadAttention draws the packed
[3d, d] in-projection with Xavier-uniform, bound sqrt(6 / (d + 3d)), and zeroes
the in- and out-projection biases.
"""

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn


def uniform(bound: float) -> nn.initializers.Initializer:
  """Return an initializer drawing U(-bound, bound)."""

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

  return init


def fan_in_bound(fan_in: int) -> float:
  """1 / sqrt(fan_in): PyTorch's bound for Linear and Conv weights and biases."""
  return 1.0 / math.sqrt(fan_in)


def packed_qkv_bound(d_model: int) -> float:
  """Xavier-uniform bound of a packed [3 d_model, d_model] in-projection."""
  return math.sqrt(6.0 / (d_model + 3 * d_model))


def torch_dense(features: int, fan_in: int, *, dtype: Any = None, zero_bias: bool = False,
                kernel_bound: float | None = None, name: str | None = None) -> nn.Dense:
  """Return an nn.Dense initialised as PyTorch's Linear.

  The kernel is U(+-kernel_bound), by default U(+-1/sqrt(fan_in)); the bias is
  U(+-1/sqrt(fan_in)) unless zero_bias. Parameters stay float32 and dtype sets
  the computation dtype.
  """
  bound = fan_in_bound(fan_in)
  return nn.Dense(
      features,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=uniform(bound if kernel_bound is None else kernel_bound),
      bias_init=nn.initializers.zeros if zero_bias else uniform(bound),
      name=name)


def init_params(model: nn.Module, key: jax.Array, example_input_shape: Sequence[int]) -> Any:
  """Initialise a denoiser's parameters from the shape of one input batch.

  The model is called as model(x_t, t, train=False) on zeros of
  example_input_shape (float32) and t = 0 per sample (int32). Returns the
  "params" collection.
  """
  example_input_shape = tuple(int(n) for n in example_input_shape)
  if not example_input_shape:
    raise ValueError("example_input_shape must start with a batch axis, got ().")
  x = jnp.zeros(example_input_shape, jnp.float32)
  t = jnp.zeros(example_input_shape[:1], jnp.int32)
  init = jax.jit(lambda k, x, t: model.init(k, x, t, train=False)["params"])
  return init(key, x, t)


def count_params(params: Any) -> int:
  """Total number of scalar entries in a parameter tree (arrays or shape structs)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
