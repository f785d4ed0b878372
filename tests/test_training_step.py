"""Tests of the train step, objectives, schedules and batches on tiny models."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from biasdiff import diffusion
from biasdiff import rng
from biasdiff.training import batches
from biasdiff.training import loop
from biasdiff.training import lr_schedules
from biasdiff.training import objectives
from biasdiff.training import state as state_lib
from biasdiff.training import step as step_lib
from helpers import tiny_training as tiny

ADAM = (0.9, 0.999, 1e-8)
EMA_DECAY = 0.9
LEARNING_RATE = 3e-2


def _jit(f):
  return jax.jit(f, compiler_options=tiny.COMPILER_OPTIONS)


@functools.cache
def _functions():
  """Jitted init and K-step functions of the tiny sequence task, shared by tests."""
  model = tiny.TinyDenoiser()
  x_example, t_example = tiny.sequence_task().example_input
  optimizer = state_lib.make_optimizer(*ADAM)
  init = state_lib.make_init_fn(
      lambda key: model.init(key, x_example, t_example, train=False)["params"],
      optimizer, use_ema=True)
  model_step = step_lib.make_model_step(step_lib.flax_apply_fn(model),
                                        tiny.sequence_objective(), optimizer, EMA_DECAY)
  multi_step = step_lib.make_multi_step(step_lib.make_train_step(model_step))
  return _jit(init), _jit(multi_step), model_step


def _batches(data, seeds, batch_size, first_step, num_steps):
  """x0 [K, M, B, L] and valid [K, M, B] of steps first ... first + K - 1."""
  source = batches.BatchSource(data, seeds, batch_size)
  box = tuple(slice(None) for _ in source.batch_shape(num_steps))
  return source.local_batches(first_step, num_steps, box)


def _train(models, data, num_steps, steps_per_dispatch=1, batch_size=4):
  """Run num_steps steps with the plain (unsharded) jitted functions."""
  init, multi_step, _ = _functions()
  seeds = np.array([m.seed for m in models], np.int32)
  state = init(np.array([m.init_seed for m in models], np.int32))
  all_metrics = []
  for first in range(0, num_steps, steps_per_dispatch):
    x0, valid = _batches(data, seeds, batch_size, first, steps_per_dispatch)
    lrs = np.full(steps_per_dispatch, LEARNING_RATE, np.float32)
    state, metrics = multi_step(state, seeds, x0, valid, lrs)
    all_metrics.append(metrics)
  metrics = {k: np.concatenate([m[k] for m in all_metrics]) for k in all_metrics[0]}
  return state, metrics


def _assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       rtol=rtol, atol=atol),
               actual, expected)


# ---------------------------------------------------------------------------
# The step.


def test_pair_step_equals_two_single_steps():
  models = tiny.tiny_models(2)
  data = tiny.sequence_data(2)
  pair, pair_metrics = _train(models, data, num_steps=3)
  for m in range(2):
    single, single_metrics = _train(models[m:m + 1], data[m:m + 1], num_steps=3)
    _assert_trees_close(state_lib.select_models(pair.params, [m]), single.params)
    _assert_trees_close(state_lib.select_models(pair.ema_params, [m]), single.ema_params)
    _assert_trees_close(state_lib.select_models(pair.opt_state, [m]), single.opt_state)
    np.testing.assert_allclose(pair_metrics["loss"][:, m], single_metrics["loss"][:, 0],
                               rtol=1e-6)
  # The two models really differ, so the comparison above is not vacuous.
  difference = jax.tree.map(lambda x: float(jnp.max(jnp.abs(x[0] - x[1]))), pair.params)
  assert max(jax.tree.leaves(difference)) > 1e-3


def test_scanned_steps_equal_single_steps():
  models = tiny.tiny_models(2)
  data = tiny.sequence_data(2)
  one_at_a_time, metrics_1 = _train(models, data, num_steps=6, steps_per_dispatch=1)
  scanned, metrics_3 = _train(models, data, num_steps=6, steps_per_dispatch=3)
  _assert_trees_close(scanned.params, one_at_a_time.params)
  _assert_trees_close(scanned.ema_params, one_at_a_time.ema_params)
  assert int(scanned.step) == int(one_at_a_time.step) == 6
  for name in step_lib.METRIC_NAMES:
    np.testing.assert_allclose(metrics_3[name], metrics_1[name], rtol=1e-5)


def test_step_is_adam_with_documented_keys():
  """One model's step equals optax.adam on the loss with fold(seed, STREAM, step, ...) keys."""
  model = tiny.TinyDenoiser()
  objective = tiny.sequence_objective()
  spec = tiny.tiny_models(1)[0]
  data = tiny.sequence_data(1)
  init, multi_step, _ = _functions()
  state = init(np.array([spec.init_seed], np.int32))
  params = jax.tree.map(lambda x: x[0], state.params)
  reference_optimizer = optax.adam(LEARNING_RATE, *ADAM)
  opt_state = reference_optimizer.init(params)
  ema = params
  x0, valid = _batches(data, [spec.seed], 4, 0, 3)

  @_jit
  def reference_step(params, opt_state, x0, valid, step):
    rows = jnp.arange(x0.shape[0])
    keys = jax.vmap(lambda row: rng.fold(spec.seed, rng.NOISE, step, row))(rows)
    dropout = rng.fold(spec.seed, rng.DROPOUT, step)

    def loss_fn(p):
      denoise = lambda x_t, t: model.apply({"params": p}, x_t, t, train=True,
                                           rngs={"dropout": dropout})
      return objective(denoise, x0, valid, keys)[0]

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = reference_optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for step in range(3):
    params, opt_state = reference_step(params, opt_state, x0[step, 0], valid[step, 0], step)
    ema = jax.tree.map(lambda e, p: EMA_DECAY * e + (1 - EMA_DECAY) * p, ema, params)

  trained, _ = _train([spec], data, num_steps=3)
  _assert_trees_close(jax.tree.map(lambda x: x[0], trained.params), params)
  _assert_trees_close(jax.tree.map(lambda x: x[0], trained.ema_params), ema)


def test_masked_loss_is_mean_over_real_rows():
  """A padded batch's loss is the mean of its real rows' losses; padding is ignored."""
  model = tiny.TinyDenoiser()
  objective = tiny.sequence_objective()
  init, _, _ = _functions()
  params = jax.tree.map(lambda x: x[0], init(np.array([7], np.int32)).params)
  denoise = lambda x_t, t: model.apply({"params": params}, x_t, t, train=False)
  tokens = jnp.asarray(tiny.sequence_data(1, n=4)[0])
  keys = jax.vmap(lambda row: rng.fold(5, rng.NOISE, 0, row))(jnp.arange(4))
  valid = jnp.array([True, True, True, False])

  loss, _ = objective(denoise, tokens, valid, keys)
  per_row = [objective(denoise, tokens[i:i + 1], valid[i:i + 1], keys[i:i + 1])[0]
             for i in range(3)]
  np.testing.assert_allclose(loss, np.mean(per_row), rtol=1e-6)

  changed_padding = tokens.at[3].set((tokens[3] + 1) % tiny.NUM_SYMBOLS)
  np.testing.assert_allclose(objective(denoise, changed_padding, valid, keys)[0], loss,
                             rtol=1e-7)


def test_padded_rows_do_not_change_the_update():
  models = tiny.tiny_models(1)
  data = tiny.sequence_data(1, n=6)  # batch 4: the second batch has 2 real rows
  init, multi_step, _ = _functions()
  seeds = np.array([models[0].seed], np.int32)
  state = init(np.array([models[0].init_seed], np.int32))
  x0, valid = _batches(data, seeds, 4, 1, 1)
  assert valid.sum() == 2
  lrs = np.full(1, LEARNING_RATE, np.float32)
  reference, _ = multi_step(state, seeds, x0, valid, lrs)
  x0_other = x0.copy()
  x0_other[~valid] = (x0_other[~valid] + 1) % tiny.NUM_SYMBOLS
  state = init(np.array([models[0].init_seed], np.int32))
  other, _ = multi_step(state, seeds, x0_other, valid, lrs)
  _assert_trees_close(other.params, reference.params, rtol=0, atol=0)


def test_fit_with_dispatch_chunks_equals_one_step_dispatch(tmp_path):
  """Through the loop: K = 2 over 3-step epochs (padded last batch) equals K = 1."""
  task = tiny.sequence_task()
  results = []
  for k in (1, 2):
    config = tiny.tiny_config(num_epochs=2, steps_per_dispatch=k)
    results.append(loop.fit(config, str(tmp_path / f"k{k}"), task,
                            compiler_options=tiny.COMPILER_OPTIONS))
  assert results[0].steps_per_epoch == 3  # n = 10, B = 4: batches of 4, 4 and 2
  assert results[0].step == results[1].step == 6
  _assert_trees_close(results[1].state.params, results[0].state.params)
  # The loop's result equals the plain jitted functions on the same batches.
  plain, _ = _train(task.models, task.train_data, num_steps=6)
  _assert_trees_close(results[0].state.params, plain.params)


def test_non_finite_loss_names_step_and_model(tmp_path):
  generator = np.random.default_rng(0)
  images = generator.normal(size=(2, 8, 4, 4, 1)).astype(np.float32)
  images[1, :, 0, 0, 0] = np.nan  # every image of model 1 (block 1)
  config = tiny.tiny_config(num_epochs=2)
  with pytest.raises(FloatingPointError, match=r"step 0 \(epoch 0\) for model 1 \(block 1"):
    loop.fit(config, str(tmp_path), tiny.image_task(images),
             compiler_options=tiny.COMPILER_OPTIONS)


# ---------------------------------------------------------------------------
# Objectives.


def test_time_and_noise_draws_cover_the_range():
  keys = jax.vmap(lambda i: rng.fold(3, rng.NOISE, 0, i))(jnp.arange(2000))
  t, eps = objectives.draw_time_and_noise(keys, (8, 4), 1, 5)
  assert t.dtype == jnp.int32
  assert set(np.unique(np.asarray(t))) == {1, 2, 3, 4, 5}
  assert eps.shape == (2000, 8, 4)
  assert abs(float(eps.mean())) < 0.01
  assert abs(float(eps.std()) - 1.0) < 0.01
  # A row's draws depend only on its own key.
  t_row, eps_row = objectives.draw_time_and_noise(keys[7:8], (8, 4), 1, 5)
  assert int(t_row[0]) == int(t[7])
  np.testing.assert_array_equal(eps_row[0], eps[7])


def test_sequence_objective_closed_forms():
  schedule = diffusion.sequence_schedule(50)
  objective = objectives.SequenceX0Objective(schedule, num_symbols=6)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 6, (300, 16)), jnp.uint8)
  keys = jax.vmap(lambda i: rng.fold(2, rng.NOISE, 0, i))(jnp.arange(300))
  valid = jnp.ones(300, bool).at[-5:].set(False)
  one_hot = jax.nn.one_hot(tokens, 6)

  # Uniform logits: the cross-entropy is log q exactly.
  uniform = lambda x_t, t: jnp.zeros_like(x_t)
  np.testing.assert_allclose(objective(uniform, tokens, valid, keys)[0], math.log(6),
                             rtol=1e-6)

  # The network receives x_t = sqrt(abar_t) e(x0) + sqrt(1 - abar_t) eps with t in 1 ... T,
  # so a "network" that inverts this must find standard normal noise.
  recovered = []

  def inverting(x_t, t):
    assert t.shape == (300,)
    signal = schedule.signal_scale(t)[:, None, None]
    noise = schedule.noise_scale(t)[:, None, None]
    recovered.append((x_t - signal * one_hot) / noise)
    return 50.0 * one_hot  # near-certain clean tokens: loss near 0

  loss, metrics = objective(inverting, tokens, valid, keys)
  assert float(loss) < 1e-6
  assert float(metrics["loss"]) == float(loss)
  eps = np.asarray(recovered[0])
  assert abs(eps.mean()) < 0.02
  assert abs(eps.std() - 1.0) < 0.02


def test_image_objective_exact_noise_prediction_has_zero_loss():
  schedule = diffusion.ddpm_schedule(100)
  objective = objectives.ImageEpsObjective(schedule, t_min=1)
  x0 = jnp.asarray(np.random.default_rng(2).normal(size=(64, 4, 4, 1)), jnp.float32)
  keys = jax.vmap(lambda i: rng.fold(4, rng.NOISE, 0, i))(jnp.arange(64))
  valid = jnp.ones(64, bool)
  seen_t = []

  def exact(x_t, t):
    seen_t.append(t)
    signal = schedule.signal_scale(t)[:, None, None, None]
    noise = schedule.noise_scale(t)[:, None, None, None]
    return (x_t - signal * x0) / noise

  loss, _ = objective(exact, x0, valid, keys)
  assert float(loss) < 1e-8
  assert int(jnp.min(seen_t[0])) >= 1
  # A zero prediction costs the mean squared noise, about 1.
  zero_loss, _ = objective(lambda x_t, t: jnp.zeros_like(x_t), x0, valid, keys)
  assert abs(float(zero_loss) - 1.0) < 0.1


def test_image_objective_rejects_t_min_outside_schedule():
  with pytest.raises(ValueError, match="train_t_min=100"):
    objectives.ImageEpsObjective(diffusion.ddpm_schedule(100), t_min=100)


# ---------------------------------------------------------------------------
# Learning-rate schedules.


def test_paper_epoch_schedule_values():
  factor = lambda e: float(lr_schedules.paper_epoch_factor(e, 30_000))
  assert factor(0) == 1.0
  assert factor(25) == 0.75
  assert factor(50) == 0.5
  assert abs(factor(30_000) - 0.1) < 1e-12
  assert abs(factor(51) - 0.5) < 1e-6  # continuous at e = 50
  assert abs(factor(15_025) - 0.3) < 1e-12  # half-way through the cosine
  assert np.all(np.diff(lr_schedules.paper_epoch_factor(np.arange(30_001), 30_000)) <= 0)


def test_paper_schedule_is_constant_within_an_epoch():
  config = tiny.tiny_config(learning_rate=3e-4, lr_schedule="paper_epoch", num_epochs=200)
  learning_rate = lr_schedules.make_learning_rate_fn(config.train, steps_per_epoch=24)
  rates = learning_rate(np.arange(24 * 200))
  per_epoch = rates.reshape(200, 24)
  np.testing.assert_array_equal(per_epoch, per_epoch[:, :1].repeat(24, axis=1))
  np.testing.assert_allclose(per_epoch[[0, 50, 51], 0],
                             3e-4 * np.array([1.0, 0.5, 0.5 - 0.4 * (1 - math.cos(
                                 math.pi / 150)) / 2]), rtol=1e-6)
  assert rates.dtype == np.float32


def test_warmup_cosine_schedule_values():
  factor = lambda s: float(lr_schedules.warmup_cosine_factor(s, 200, 4000, 0.0))
  assert factor(0) == 1 / 200
  assert factor(199) == 1.0
  assert factor(200) == 1.0
  assert abs(factor(2100) - 0.5) < 1e-12
  assert factor(4000) == 0.0
  assert factor(5000) == 0.0
  assert float(lr_schedules.warmup_cosine_factor(4000, 200, 4000, 0.1)) == pytest.approx(0.1)


def test_unknown_schedule_raises():
  config = tiny.tiny_config(lr_schedule="linear")
  with pytest.raises(ValueError, match="'linear'"):
    lr_schedules.make_learning_rate_fn(config.train, 3)


# ---------------------------------------------------------------------------
# Epochs and batches.


@pytest.mark.parametrize("n, steps, last", [(5_000, 10, 392), (12_000, 24, 224),
                                            (70_000, 137, 368)])
def test_steps_per_epoch_of_paper_sizes(n, steps, last):
  assert batches.steps_per_epoch(n, 512) == steps
  assert n - (steps - 1) * 512 == last


def test_epoch_visits_every_row_once():
  data = np.arange(2 * 10).reshape(2, 10, 1)
  source = batches.BatchSource(data, seeds=[11, 12], batch_size=4)
  assert source.steps_per_epoch == 3
  orders = []
  for epoch in range(2):
    rows = []
    for step in range(3 * epoch, 3 * epoch + 3):
      indices, valid = source.indices(step)
      rows.append(np.where(valid, indices, -1))
    rows = np.concatenate(rows, axis=1)
    assert (rows == -1).sum(axis=1).tolist() == [2, 2]  # the padded last batch
    for m in range(2):
      assert sorted(rows[m][rows[m] >= 0]) == list(range(10))
    orders.append(rows)
  assert not np.array_equal(orders[0][0], orders[1][0])  # a fresh order per epoch
  assert not np.array_equal(orders[0][0], orders[0][1])  # and per model


def test_epoch_order_depends_only_on_seed_and_epoch():
  order = batches.epoch_permutations([11, 12], 3, 10)
  np.testing.assert_array_equal(batches.epoch_permutations([12], 3, 10)[0], order[1])
  expected = np.asarray(jax.random.permutation(rng.fold(11, rng.EPOCH, 3), 10))
  np.testing.assert_array_equal(order[0], expected)


def test_local_batches_gather_the_right_rows():
  data = np.arange(2 * 10 * 3).reshape(2, 10, 3)
  source = batches.BatchSource(data, seeds=[11, 12], batch_size=4)
  box = (slice(0, 2), slice(1, 2), slice(2, 4), slice(0, 3))
  x0, valid = source.local_batches(2, 2, box)
  assert x0.shape == (2, 1, 2, 3)
  for k, step in enumerate((2, 3)):
    indices, mask = source.indices(step)
    np.testing.assert_array_equal(x0[k, 0], data[1, indices[1, 2:4]])
    np.testing.assert_array_equal(valid[k, 0], mask[1, 2:4])


# ---------------------------------------------------------------------------
# Model lists and seeds.


def test_zoo_models_and_seeds():
  models = state_lib.zoo_models(12_000, blocks=range(14), replicates=(0, 1),
                                extra_models=((14, 0),))
  assert len(models) == 29
  assert (models[0].block, models[0].replicate) == (0, 0)
  assert (models[-1].block, models[-1].replicate) == (14, 0)
  assert len({m.seed for m in models}) == 29
  assert all(m.seed == m.init_seed for m in models)
  assert models[3].seed == state_lib.derive_train_seed(0, 12_000, 1, 1)
  assert state_lib.derive_train_seed(0, 12_000, 1, 1) != state_lib.derive_train_seed(
      0, 5_000, 1, 1)
  shared = state_lib.zoo_models(12_000, (0, 1), (0, 1), share_init_across_blocks=True)
  assert shared[2].init_seed == shared[0].init_seed  # block 1 starts from block 0's init
  assert shared[2].seed != shared[0].seed
  with pytest.raises(ValueError, match=r"\(0, 1\)"):
    state_lib.zoo_models(512, (0,), (0, 1), extra_models=((0, 1),))
