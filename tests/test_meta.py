"""Meta-learning over a distribution of tasks: MAML, FOMAML, Meta-SGD, iMAML and a
third level, against closed forms on a quadratic task family and central differences
(float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hypergrad as hg

D = 3  # weights
SHOTS = 4


def centres(key):
    """A task: a centre c ~ N(0, I); support and query points scattered around it."""
    kc, ks, kq = jax.random.split(key, 3)
    c = jax.random.normal(kc, (D,))
    return (c[None] + 0.3 * jax.random.normal(ks, (SHOTS, D)),
            c[None] + 0.3 * jax.random.normal(kq, (SHOTS, D)))


def quad_loss(w, batch):
    return 0.5 * jnp.mean(jnp.sum((w["w"][None] - batch) ** 2, axis=-1))


def quad_task(batch=5, steps=3, inner_lr=0.3, **options):
    return hg.meta.maml({"w": jnp.full(D, 0.5)}, quad_loss, hg.tasks.Tasks(centres, batch),
                        steps=steps, inner_lr=inner_lr, **options)


def drawn(task, key):
    """The tasks an estimate with ``key`` draws (as hypergrad.tasks.mean splits it)."""
    draw, _ = jax.random.split(key)
    return task.tasks.draws(draw)


def closed_form(theta, lr, steps, support, query):
    """Full-batch GD on 0.5 mean ||w - x||^2 from theta: w_K = m + (1 - lr)^K (theta - m);
    the query loss, its gradient in theta, and in lr."""
    m, mq = support.mean(0), query.mean(0)
    shrink = (1 - lr) ** steps
    w = m + shrink * (theta - m)
    value = 0.5 * np.mean(np.sum((w - query) ** 2, axis=-1))
    d_theta = shrink * (w - mq)
    d_lr = (w - mq) @ (-steps * (1 - lr) ** (steps - 1) * (theta - m))
    return value, d_theta, d_lr, w


def test_maml_reverse_equals_the_closed_form_mean_over_the_drawn_tasks():
    task = quad_task(learn_lr=True)
    phi, key = task.space.init(), jax.random.key(3)
    value, grad, aux = hg.estimators.reverse()(task, phi, key)
    support, query = map(np.asarray, drawn(task, key))
    theta = np.full(D, 0.5)
    parts = [closed_form(theta, 0.3, 3, s, q) for s, q in zip(support, query, strict=True)]
    np.testing.assert_allclose(value, np.mean([p[0] for p in parts]), rtol=1e-12)
    np.testing.assert_allclose(grad["init"], np.mean([p[1] for p in parts], 0), rtol=1e-10)
    # d/d log(lr) = lr * d/d lr
    np.testing.assert_allclose(grad["learning_rate"], 0.3 * np.mean([p[2] for p in parts]),
                               rtol=1e-10)
    # each task's adapted weights are kept, on a task axis
    np.testing.assert_allclose(aux["params"]["w"], np.stack([p[3] for p in parts]),
                               rtol=1e-12)
    assert np.shape(aux["train_loss"]) == ()


def test_fomaml_is_the_validation_gradient_at_the_adapted_weights():
    task = quad_task()
    phi, key = task.space.init(), jax.random.key(4)
    value, grad, _ = hg.estimators.first_order()(task, phi, key)
    support, query = map(np.asarray, drawn(task, key))
    theta = np.full(D, 0.5)
    parts = [closed_form(theta, 0.3, 3, s, q) for s, q in zip(support, query, strict=True)]
    first = np.mean([w - q.mean(0) for (*_, w), q in zip(parts, query, strict=True)], 0)
    np.testing.assert_allclose(value, np.mean([p[0] for p in parts]), rtol=1e-12)
    np.testing.assert_allclose(grad["init"], first, rtol=1e-10)
    # and it is not MAML's: the (1 - lr)^K factor is missing
    exact = hg.estimators.reverse()(task, phi, key)[1]["init"]
    np.testing.assert_allclose(exact, (1 - 0.3) ** 3 * first, rtol=1e-10)


def test_estimate_value_is_the_objective_value_for_the_same_key():
    task = quad_task()
    phi, key = task.space.init(), jax.random.key(5)
    value, _ = hg.unroll.objective(task, phi, key)
    for est in (hg.estimators.reverse(), hg.estimators.forward(),
                hg.estimators.first_order()):
        np.testing.assert_allclose(est(task, phi, key)[0], value, rtol=1e-13)


def test_each_gives_every_drawn_task_its_own_value_and_mean_averages_them():
    task = quad_task()
    phi, key = task.space.init(), jax.random.key(6)

    def one(t, phi, k):  # reads the drawn task's data through the task it is given
        value, aux = hg.unroll.objective(t, phi, k)
        return {"value": value, "support": t.train_data, "w": aux["params"]["w"]}

    out = hg.tasks.each(one, task, phi, key)
    support, query = map(np.asarray, drawn(task, key))
    np.testing.assert_array_equal(out["support"], support)
    parts = [closed_form(np.full(D, 0.5), 0.3, 3, s, q)
             for s, q in zip(support, query, strict=True)]
    np.testing.assert_allclose(out["value"], [p[0] for p in parts], rtol=1e-12)
    np.testing.assert_allclose(out["w"], np.stack([p[3] for p in parts]), rtol=1e-12)
    value, _ = hg.tasks.mean(lambda t, p, k: hg.unroll.objective(t, p, k), task, phi, key)
    np.testing.assert_allclose(value, np.mean(out["value"]), rtol=1e-13)


def sine_tasks(key):
    """Sinusoid regression (Finn et al. 2017), small: amplitude, phase, 5 shots."""
    ka, kp, kx = jax.random.split(key, 3)
    amp = jax.random.uniform(ka, (), minval=0.1, maxval=5.0)
    phase = jax.random.uniform(kp, (), minval=0.0, maxval=jnp.pi)
    x = jax.random.uniform(kx, (10, 1), minval=-5.0, maxval=5.0)
    y = amp * jnp.sin(x + phase)
    return (x[:5], y[:5]), (x[5:], y[5:])


def mlp_params(key, width=8):
    k1, k2 = jax.random.split(key)
    return {"w1": 0.5 * jax.random.normal(k1, (1, width)), "b1": jnp.zeros(width),
            "w2": 0.5 * jax.random.normal(k2, (width, 1)), "b2": jnp.zeros(1)}


def mse(p, batch):
    x, y = batch
    h = jnp.tanh(x @ p["w1"] + p["b1"][None])
    return jnp.mean((h @ p["w2"] + p["b2"][None] - y) ** 2)


def sine_task(**options):
    return hg.meta.maml(mlp_params(jax.random.key(0)), mse, hg.tasks.Tasks(sine_tasks, 3),
                        steps=2, inner_lr=0.01, **options)


@pytest.mark.parametrize("learn_lr", [False, "per_parameter"])
def test_maml_and_meta_sgd_on_sinusoids_match_central_differences(learn_lr):
    task = sine_task(learn_lr=learn_lr)
    err = hg.check_hypergrad(hg.estimators.reverse(), task, task.space.init(),
                             jax.random.key(1), directions=4)
    assert err < 1e-6
    if learn_lr:  # one learned rate per weight, laid out like the weights
        lr = task.space.constrain(task.space.init())["learning_rate"]
        assert jax.tree.map(jnp.shape, lr) == jax.tree.map(jnp.shape, mlp_params(
            jax.random.key(0)))


def test_imaml_implicit_on_the_proximal_loss_equals_the_closed_form():
    lam, steps = 1.0, 60
    task = quad_task(proximal_strength=lam, steps=steps, inner_lr=0.4)
    phi, key = task.space.init(), jax.random.key(6)
    value, grad, _ = hg.estimators.implicit(tol=1e-12, maxiter=50)(task, phi, key)
    support, query = map(np.asarray, drawn(task, key))
    theta = np.full(D, 0.5)
    d_theta, d_lam = [], []
    for s, q in zip(support, query, strict=True):
        m, mq = s.mean(0), q.mean(0)
        w = (m + lam * theta) / (1 + lam)  # the proximal problem's minimizer
        d_theta.append(lam / (1 + lam) * (w - mq))
        d_lam.append((w - mq) @ ((theta - m) / (1 + lam) ** 2))
    np.testing.assert_allclose(grad["init"], np.mean(d_theta, 0), rtol=1e-8)
    np.testing.assert_allclose(grad["proximal"], lam * np.mean(d_lam), rtol=1e-8)
    # the proximal term is what ties the adapted weights to the start: reverse through
    # the 60 converged steps agrees
    exact = hg.estimators.reverse()(task, phi, key)[1]
    np.testing.assert_allclose(exact["init"], grad["init"], rtol=1e-8)


def test_stacked_tasks_draw_from_the_given_arrays():
    rng = np.random.default_rng(0)
    support, query = rng.standard_normal((7, SHOTS, D)), rng.standard_normal((7, SHOTS, D))
    tasks = hg.tasks.stacked(support, query, batch=4)
    task = hg.meta.maml({"w": jnp.zeros(D)}, quad_loss, tasks, steps=2, inner_lr=0.5)
    train, val = drawn(task, jax.random.key(0))
    assert train.shape == (4, SHOTS, D)
    for s, q in zip(np.asarray(train), np.asarray(val), strict=True):
        i = [j for j in range(7) if np.array_equal(support[j], s)]
        assert len(i) == 1 and np.array_equal(query[i[0]], q)
    assert hg.check_hypergrad(hg.estimators.reverse(), task, task.space.init(),
                              jax.random.key(0)) < 1e-6


def test_meta_training_through_tune_lowers_the_loss_on_held_out_tasks():
    task = quad_task(batch=8, steps=1, inner_lr=0.1)
    history = hg.tune(task, hg.estimators.reverse(), optax.adam(0.1), meta_steps=15,
                      key=jax.random.key(0))
    assert history.stopped is None or "budget" not in str(history.stopped)
    held_out = task.replace(tasks=task.tasks.replace(batch=200))
    before = hg.unroll.objective(held_out, task.space.init(), jax.random.key(99))[0]
    after = hg.unroll.objective(held_out, history.best.phi, jax.random.key(99))[0]
    # the mean centre is 0: the learned start moves from 0.5 towards it
    assert after < 0.9 * before
    assert np.all(np.abs(np.asarray(history.best.hparams["init"])) < 0.45)


def test_three_levels_meta_learner_step_size_matches_central_differences():
    lower = quad_task(batch=2, steps=1, inner_lr=0.3, learn_lr=True)
    upper = hg.meta.nest(lower, tuned=("init",),
                         space=hg.HyperSpace({"learning_rate": hg.positive(0.5),
                                              "lower.learning_rate": hg.positive(0.2)}),
                         steps=2, val_keys=2)
    phi = upper.space.init()
    err = hg.check_hypergrad(hg.estimators.reverse(), upper, phi, jax.random.key(2))
    assert err < 1e-6
    # the middle level's weights are the lower start; its inner step a meta-step
    value, grad, _ = hg.estimators.reverse()(upper, phi, jax.random.key(2))
    assert np.isfinite(value) and set(grad) == {"learning_rate", "lower.learning_rate"}


def test_bad_input_reads_clearly():
    with pytest.raises(ValueError, match="leave train_data and val_data out"):
        hg.Task(params=jnp.zeros(D), train_loss=lambda w, h, b: 0.0,
                val_loss=lambda w, h, b: 0.0, train_data=jnp.zeros((2, D)),
                space=hg.HyperSpace({}), optimizer=hg.inner.sgd(0.1), steps=1,
                tasks=hg.tasks.Tasks(centres, 2))
    with pytest.raises(ValueError, match="train_data is missing"):
        hg.Task(params=jnp.zeros(D), train_loss=lambda w, h, b: 0.0,
                val_loss=lambda w, h, b: 0.0, space=hg.HyperSpace({}),
                optimizer=hg.inner.sgd(0.1), steps=1)
    with pytest.raises(ValueError, match="positive integer"):
        hg.tasks.Tasks(centres, 0)
    with pytest.raises(TypeError, match="no pool"):
        hg.tasks.Tasks(lambda key, pool: pool, 2)
    with pytest.raises(ValueError, match="learn_lr"):
        quad_task(learn_lr="per_layer")
    with pytest.raises(ValueError, match="tuned must name"):
        hg.meta.nest(quad_task(), tuned=("bias",), space=hg.HyperSpace(
            {"learning_rate": hg.positive(0.1)}), steps=2)


def test_meta_training_killed_and_resumed_from_its_workdir_equals_an_uninterrupted_run(
        tmp_path):
    task = quad_task(batch=4, steps=1, inner_lr=0.1)

    def run(path, **kw):
        return hg.tune(task, hg.estimators.first_order(), optax.adam(0.1), meta_steps=4,
                       key=jax.random.key(0), population=2, workdir=path, **kw)

    whole = run(tmp_path / "whole")

    def kill(record, state):
        if record["meta_step"] == 1:
            raise KeyboardInterrupt  # as a kill after meta-step 1

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", callback=kill)
    resumed = run(tmp_path / "run")
    assert len(resumed) == len(whole) == 4
    # fresh tasks every meta-step, drawn from the meta-step's key: the same after a resume
    np.testing.assert_array_equal(resumed.val_loss, whole.val_loss)
    np.testing.assert_array_equal(np.asarray(resumed.final.hparams["init"]),
                                  np.asarray(whole.final.hparams["init"]))
    assert resumed.best.val_loss == whole.best.val_loss
