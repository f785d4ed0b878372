"""Denoising objectives: map one model's batch and per-sample keys to a loss.

An objective is called as

  loss, metrics = objective(denoise, x0, valid, sample_keys)

where `denoise(x_t, t)` is the network in training mode, with parameters and
dropout key already bound, and `x0` is the clean batch [batch, ...]. `valid`
is a [batch] bool mask, False on the padding of a partial last batch, and
`sample_keys` contains one typed key per row. Each row draws its diffusion time and noise from its own
key, so the draws depend on the row's position in the global batch and not on
how the batch is split over devices.

Losses are means over the real entries only, so a padded partial batch weighs
as much as a full one.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from biasdiff import diffusion

Denoise = Callable[[jax.Array, jax.Array], jax.Array]

# Sub-streams of a row's key: which draw of that row a key is for.
_TIME = 0
_NOISE = 1


def draw_time_and_noise(sample_keys: jax.Array, event_shape: tuple[int, ...],
                         t_min: int, t_max: int) -> tuple[jax.Array, jax.Array]:
  """Draw t ~ U{t_min, ..., t_max} and eps ~ N(0, I) of event_shape per row."""

  def draw(key):
    t = jax.random.randint(jax.random.fold_in(key, _TIME), (), t_min, t_max + 1,
                           dtype=jnp.int32)
    eps = jax.random.normal(jax.random.fold_in(key, _NOISE), event_shape,
                            jnp.float32)
    return t, eps

  return jax.vmap(draw)(sample_keys)


def _masked_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean of values [batch, ...] over the rows where valid [batch] is True."""
  weights = jnp.broadcast_to(
      valid.reshape(valid.shape + (1,) * (values.ndim - 1)), values.shape)
  weights = weights.astype(jnp.float32)
  # max(., 1) keeps an all-padding batch at loss 0 rather than 0 / 0.
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


@dataclasses.dataclass(frozen=True, eq=False)
class SequenceX0Objective:
  """Cross-entropy of an x0-predicting network on noised one-hot sequences.

  For tokens x0 [B, L] with one-hot form e(x0) [B, L, q], each sequence draws
  one time t ~ U{first_t, ..., last_t} of the schedule (1 ... T for the
  sequence schedule) shared by its tokens, and eps ~ N(0, I) of shape [L, q].
  With x_t = sqrt(abar_t) e(x0) + sqrt(1 - abar_t) eps the loss is

    loss = (1 / (L * #valid)) sum_{valid b} sum_i -log softmax(f(x_t, t))[b, i, x0[b, i]],

  the token-wise cross-entropy averaged over the real tokens, without any
  time weighting. Logits are taken in float32.
  """

  schedule: diffusion.Schedule
  num_symbols: int  # alphabet size q of the one-hot encoding

  def __call__(self, denoise: Denoise, x0: jax.Array, valid: jax.Array,
               sample_keys: jax.Array) -> tuple[jax.Array, dict]:
    # x0: [batch, length] integer tokens; valid: [batch]; sample_keys: [batch]
    if x0.ndim != 2 or not jnp.issubdtype(x0.dtype, jnp.integer):
      raise ValueError(
          f"SequenceX0Objective expects integer tokens [batch, length], got "
          f"{x0.dtype} {x0.shape}.")
    tokens = x0.astype(jnp.int32)
    one_hot = jax.nn.one_hot(tokens, self.num_symbols, dtype=jnp.float32)
    t, eps = draw_time_and_noise(sample_keys, one_hot.shape[1:],
                                  self.schedule.first_t, self.schedule.last_t)
    x_t = diffusion.forward_noise(self.schedule, one_hot, t, eps)
    logits = denoise(x_t, t).astype(jnp.float32)  # [batch, length, q]
    if logits.shape != one_hot.shape:
      raise ValueError(
          f"The network returned logits of shape {logits.shape}; expected "
          f"{one_hot.shape} ([batch, length, q]).")
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    # [batch, length]
    cross_entropy = -jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
    loss = _masked_mean(cross_entropy, valid)
    return loss, {"loss": loss}


@dataclasses.dataclass(frozen=True, eq=False)
class ImageEpsObjective:
  """Noise-prediction mean squared error on (already centred) images.

  For images x0 [B, H, W, C], each image draws t ~ U{t_min, ..., last_t} and
  eps ~ N(0, I) of its shape, and with x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
  the loss is

    loss = (1 / (H W C #valid)) sum_{valid b} || eps_b - f(x_t, t)_b ||^2,

  the unweighted mean over real images and pixels. With the 0-based DDPM
  schedule, t_min = 1 leaves t = 0 untrained as the authors' image code does;
  t_min = 0 trains every time.
  """

  schedule: diffusion.Schedule
  t_min: int = 1  # smallest trained time; must lie in [first_t, last_t]

  def __post_init__(self):
    if not self.schedule.first_t <= self.t_min <= self.schedule.last_t:
      raise ValueError(
          f"train_t_min={self.t_min} is outside the schedule's times "
          f"{self.schedule.first_t} ... {self.schedule.last_t}.")

  def __call__(self, denoise: Denoise, x0: jax.Array, valid: jax.Array,
               sample_keys: jax.Array) -> tuple[jax.Array, dict]:
    # x0: [batch, height, width, channels] float; valid: [batch]; sample_keys: [batch]
    if x0.ndim != 4 or not jnp.issubdtype(x0.dtype, jnp.floating):
      raise ValueError(
          f"ImageEpsObjective expects float images [batch, height, width, "
          f"channels], got {x0.dtype} {x0.shape}.")
    x0 = x0.astype(jnp.float32)
    t, eps = draw_time_and_noise(sample_keys, x0.shape[1:], self.t_min,
                                  self.schedule.last_t)
    x_t = diffusion.forward_noise(self.schedule, x0, t, eps)
    eps_hat = denoise(x_t, t).astype(jnp.float32)
    if eps_hat.shape != x0.shape:
      raise ValueError(
          f"The network returned shape {eps_hat.shape}; expected {x0.shape}.")
    loss = _masked_mean(jnp.square(eps - eps_hat), valid)
    return loss, {"loss": loss}
