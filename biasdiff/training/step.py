"""The train step: one optimizer update of every stacked model, vmapped.

Model m at global step s uses only its own batch and keys:

  per-row diffusion time and noise  fold(seed_m, NOISE, s, row)
  dropout                           fold(seed_m, DROPOUT, s)

where `row` is the row's position in the model's global batch. Keys therefore
depend on (seed, step, row) only, never on the number of devices or on how
many steps run per dispatch, which is what makes one-at-a-time, scanned,
single-device and multi-device runs agree.

Layers of functions, each testable on its own:

  make_model_step   one model, one step (pure)
  make_train_step   all models, one step: vmap over the models axis (pure)
  make_multi_step   all models, K steps: lax.scan over a stack of K batches (pure)
  compile_step      jax.jit of the multi-step with mesh shardings and donation
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from biasdiff import parallel
from biasdiff import rng
from biasdiff.training.state import TrainState

# apply_fn(params, x_t, t, dropout_key) -> network output in training mode.
ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]

METRIC_NAMES = ("loss", "grad_norm", "update_norm")


def flax_apply_fn(model) -> ApplyFn:
  """Wrap a flax.linen module called as model(x_t, t, train=...) with dropout."""

  def apply_fn(params, x_t, t, dropout_key):
    return model.apply({"params": params}, x_t, t, train=True,
                       rngs={"dropout": dropout_key})

  return apply_fn


def make_model_step(apply_fn: ApplyFn, objective: Callable,
                    optimizer: optax.GradientTransformation,
                    ema_decay: float) -> Callable:
  """Return the update of one model by one optimizer step.

  The returned function maps (params, opt_state, ema_params, seed, x0, valid,
  lr, step) to (params, opt_state, ema_params, metrics), with x0 [batch, ...],
  valid [batch] and scalars seed, lr and step. The update is Adam scaled by
  -lr, then the EMA update

    ema <- decay * ema + (1 - decay) * params

  when ema_params is not None.
  """

  def model_step(params, opt_state, ema_params, seed, x0, valid, lr, step):
    rows = jnp.arange(x0.shape[0], dtype=jnp.int32)
    sample_keys = jax.vmap(lambda row: rng.fold(seed, rng.NOISE, step, row))(rows)
    dropout_key = rng.fold(seed, rng.DROPOUT, step)

    def loss_fn(p):
      denoise = lambda x_t, t: apply_fn(p, x_t, t, dropout_key)
      return objective(denoise, x0, valid, sample_keys)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: -lr * u, updates)
    params = optax.apply_updates(params, updates)
    if ema_params is not None:
      ema_params = jax.tree.map(
          lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema_params, params)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   update_norm=optax.tree.norm(updates))
    return params, opt_state, ema_params, metrics

  return model_step


def make_train_step(model_step: Callable) -> Callable:
  """Return step(state, seeds [M], x0 [M, B, ...], valid [M, B], lr []).

  The step vmaps `model_step` over the models axis and returns the new state
  and a dict of [M] metrics.
  """

  def train_step(state: TrainState, seeds, x0, valid, lr):
    per_model = jax.vmap(model_step,
                         in_axes=(0, 0, 0, 0, 0, 0, None, None))
    params, opt_state, ema, metrics = per_model(
        state.params, state.opt_state, state.ema_params, seeds, x0, valid, lr,
        state.step)
    new_state = TrainState(step=state.step + 1, params=params,
                           opt_state=opt_state, ema_params=ema)
    return new_state, metrics

  return train_step


def make_multi_step(train_step: Callable) -> Callable:
  """Return the scan of `train_step` over a leading axis of K steps.

  multi_step(state, seeds [M], x0 [K, M, B, ...], valid [K, M, B], lr [K])
  returns the state after K steps and a dict of [K, M] metrics. It equals K
  calls of `train_step` in a row.
  """

  def multi_step(state: TrainState, seeds, x0, valid, lr):

    def body(state, inputs):
      x0_k, valid_k, lr_k = inputs
      return train_step(state, seeds, x0_k, valid_k, lr_k)

    if x0.shape[0] == 1:
      state, metrics = body(state, (x0[0], valid[0], lr[0]))
      return state, jax.tree.map(lambda m: m[None], metrics)
    # On CPU, XLA runs convolution gradients 13-40x slower inside a while loop
    # than outside one (jax 0.10.2, measured on the digits U-Net), so the scan is
    # unrolled there. Accelerators keep the rolled loop, which compiles faster.
    unroll = x0.shape[0] if jax.default_backend() == "cpu" else 1
    return jax.lax.scan(body, state, (x0, valid, lr), unroll=unroll)

  return multi_step


def compile_step(multi_step: Callable, state_shardings: TrainState, mesh,
                 compiler_options: Optional[dict] = None) -> Callable:
  """Jit the multi-step with the mesh shardings, donating the input state.

  State leaves are sharded over the model axis, batches over (model, data),
  and the [K] learning rates and [K, M] metrics are replicated so that every
  process can read the metrics. `compiler_options` go to XLA; for example
  {"xla_backend_optimization_level": 0} compiles several times faster on CPU
  at some cost in run time.
  """
  batch = parallel.batch_sharding(mesh)
  replicated = parallel.replicated_sharding(mesh)
  by_model = parallel.model_sharding(mesh)
  return jax.jit(
      multi_step,
      in_shardings=(state_shardings, by_model, batch, batch, replicated),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,),
      compiler_options=compiler_options)
