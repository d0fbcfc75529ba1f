"""The reverse estimator against closed forms and central differences (float64)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hypergrad as hg
from tests.problems import counting, logreg_task, tiny_cnn_task


def quadratic_task(alpha, steps, n=5, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, n))
    a = q @ q.T / n + 0.5 * np.eye(n)
    a /= np.linalg.eigvalsh(a).max()  # so that alpha < 2 keeps gradient descent stable
    w0 = rng.standard_normal(n)

    def loss(w, hparams, batch):
        return 0.5 * w @ (jnp.asarray(a) @ w)

    task = hg.Task(params=jnp.asarray(w0), train_loss=loss, val_loss=loss,
                   train_data=jnp.zeros(1), val_data=jnp.zeros(1),
                   space=hg.HyperSpace({"learning_rate": hg.positive(alpha)}),
                   optimizer=hg.inner.sgd(), steps=steps)
    return task, a, w0


@pytest.mark.parametrize("checkpoint", [None, "step", 4, "nested"])
@pytest.mark.parametrize("alpha, steps", [(0.3, 10), (0.9, 37)])
def test_learning_rate_of_gradient_descent_on_a_quadratic(alpha, steps, checkpoint):
    task, a, w0 = quadratic_task(alpha, steps)
    value, grad, _ = hg.estimators.reverse(checkpoint)(task, task.space.init(), jax.random.key(0))
    m = np.eye(len(w0)) - alpha * a
    w_t = np.linalg.matrix_power(m, steps) @ w0
    # d f(w_T) / d alpha = -T w_T^T A^2 (I - alpha A)^(T-1) w0; phi = log(alpha).
    dalpha = -steps * w_t @ a @ a @ np.linalg.matrix_power(m, steps - 1) @ w0
    np.testing.assert_allclose(value, 0.5 * w_t @ a @ w_t, rtol=1e-12)
    np.testing.assert_allclose(grad["learning_rate"], alpha * dalpha, rtol=1e-8)


@pytest.mark.parametrize("batch_size", [None, 20])
def test_logistic_regression_against_central_differences(batch_size):
    task = logreg_task(batch_size=batch_size)
    records = hg.directional_errors(hg.estimators.reverse(), task, task.space.init(),
                                    jax.random.key(1))
    assert [r["name"] for r in records] == ["learning_rate", "momentum", "weight_decay"]
    for r in records:
        assert abs(r["analytic"]) > 1e-6, r  # a vanishing gradient would pass trivially
        assert r["rel_error"] <= 1e-6, r


@pytest.mark.parametrize("checkpoint", ["auto", "step", 1, 5, 7, 12, 50, "nested"])
def test_checkpoint_policies_change_nothing(checkpoint):
    task = logreg_task(steps=12)
    phi, key = task.space.init(), jax.random.key(3)
    v0, g0, _ = hg.estimators.reverse(None)(task, phi, key)
    v1, g1, aux = hg.estimators.reverse(checkpoint)(task, phi, key)
    assert aux["train_losses"].shape == (12,)
    np.testing.assert_allclose(v1, v0, rtol=1e-12)
    for name in phi:
        np.testing.assert_allclose(g1[name], g0[name], rtol=1e-12)


def test_auto_checkpoint_policy_is_the_measured_rule_for_the_backend():
    from hypergrad.unroll import auto_policy, check_policy

    assert auto_policy("cpu") == "step"
    assert auto_policy("gpu") is None and auto_policy("tpu") is None
    assert check_policy("auto") == auto_policy()
    # The default estimator runs that policy: on this backend it is the same program as
    # asking for the policy by name, so the same bits.
    assert hg.estimators.reverse().options["checkpoint"] == "auto"
    task = logreg_task(steps=12)
    phi, key = task.space.init(), jax.random.key(3)
    v0, g0, _ = hg.estimators.reverse()(task, phi, key)
    v1, g1, _ = hg.estimators.reverse(auto_policy())(task, phi, key)
    assert v0 == v1
    for name in phi:
        assert np.array_equal(g0[name], g1[name])


def test_bad_checkpoint_policy():
    with pytest.raises(ValueError, match="checkpoint must be"):
        hg.estimators.reverse(checkpoint=0)


def test_one_configuration_compiles_once():
    task = logreg_task()
    task, traces = counting(task)
    est = jax.jit(hg.estimators.reverse())
    phi = task.space.init()
    zeroed = task.replace(params=jax.tree.map(jnp.zeros_like, task.params))
    est(task, phi, jax.random.key(0))
    n = len(traces)
    shifted = jax.tree.map(lambda p: p + 0.1, phi)
    est(task, shifted, jax.random.key(1))
    # New weights and data of the same shapes are arguments, not constants: no retrace.
    est(zeroed, shifted, jax.random.key(2))
    assert n > 0 and len(traces) == n


def test_batches_are_permutations_per_epoch():
    idx = np.asarray(hg.unroll.batch_indices(jax.random.key(0), 10, 3, 7))
    assert idx.shape == (7, 3)
    # three batches per epoch (one example dropped), no repeats within an epoch
    for epoch in (idx[0:3], idx[3:6]):
        assert len(set(epoch.ravel())) == 9
    assert idx.max() < 10


def test_params_as_a_function_of_hyperparameters():
    task = logreg_task()
    w = task.params

    def init(key, hparams):
        return jax.tree.map(lambda a: hparams["init_scale"] * a, w)

    space = hg.HyperSpace({**task.space.constraints, "init_scale": hg.positive(2.0)})
    task = task.replace(params=init, space=space)
    records = hg.directional_errors(hg.estimators.reverse(), task, space.init(),
                                    jax.random.key(0))
    assert max(r["rel_error"] for r in records) <= 1e-6


def test_task_validation():
    task = logreg_task()
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        task.replace(steps=0)
    with pytest.raises(ValueError, match="batch_size must be an integer in"):
        task.replace(batch_size=1000)
    with pytest.raises(ValueError, match="sgd needs learning_rate"):
        t = task.replace(space=hg.HyperSpace({"momentum": hg.unit(0.5)}))
        hg.estimators.reverse()(t, t.space.init(), jax.random.key(0))


@pytest.mark.parametrize("conv", ["matmul", "native"])
def test_tiny_cnn_against_central_differences(conv):
    task = tiny_cnn_task(conv)
    records = hg.directional_errors(hg.estimators.reverse(), task, task.space.init(),
                                    jax.random.key(0))
    assert sorted(r["name"] for r in records) == sorted(task.space.names)
    for r in records:
        assert abs(r["analytic"]) > 1e-6, r
        assert r["rel_error"] <= 1e-6, r


def test_logistic_regression_model_against_central_differences():
    from flax import nnx

    from hypergrad.task import classification

    data = hg.data.load("digits", train_size=80, val_size=40, test_size=10,
                        dtype=jnp.float64)
    model = hg.models.LogisticRegression(nnx.Rngs(0), 64, 10, param_dtype=jnp.float64)
    space = hg.HyperSpace({"learning_rate": hg.positive(0.5), "momentum": hg.unit(0.5),
                           "weight_decay": hg.positive(1e-2)})
    task, _ = classification(model, data, space, steps=10, batch_size=20, loss="ce")
    assert hg.check_hypergrad(hg.estimators.reverse(), task, space.init(),
                              jax.random.key(0)) <= 1e-6


def _rich_cnn_task():
    """The tiny CNN with every kind of hyperparameter that enters the gradient: per-layer
    slopes, loss mix, label smoothing, per-example weights, a per-step learning rate."""
    from hypergrad.task import seed_cnn

    data = hg.data.load("digits", train_size=60, val_size=30, test_size=10,
                        dtype=jnp.float64)
    space = hg.HyperSpace({
        "learning_rate": hg.positive(0.1, schedule="per_step"), "momentum": hg.unit(0.5),
        "weight_decay": hg.positive(1e-3, per="layer"),
        "leaky_slope": hg.bounded(0.1, 0.0, 1.0, per="layer"),
        "loss_mix": hg.unit(0.3), "label_smoothing": hg.unit(0.1),
        "example_weight": hg.real(np.zeros(60))})
    task, _ = seed_cnn(data, space, steps=6, batch_size=10, channels=(3, 4, 4),
                       dtype=jnp.float64)
    return task


def _moved(phi):
    """``phi`` moved off its initial values, differently in every element."""
    return jax.tree.map(lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)),
                        phi)


@functools.cache
def _rich_reverse(checkpoint, moved, seed):
    """``reverse(checkpoint, hvp="reverse")`` on the rich CNN at ``_moved(init)`` (or
    ``init``) with ``key(seed)``: the plain-autodiff reference several tests compare
    against, computed once per process (under pytest-xdist, once per worker that runs
    one of them)."""
    task = _rich_cnn_task()
    phi = _moved(task.space.init()) if moved else task.space.init()
    return hg.estimators.reverse(checkpoint, hvp="reverse")(task, phi, jax.random.key(seed))


@pytest.mark.parametrize("checkpoint", [None, "step", 4, "nested"])
def test_forward_over_reverse_hvp_equals_reverse_over_reverse(checkpoint):
    # hvp="forward" backpropagates through each step's gradient with a Hessian-vector
    # product by jvp; it must give the plain autodiff (default) hypergradient.
    task = _rich_cnn_task()
    phi = _moved(task.space.init())
    key = jax.random.key(2)
    v0, g0, _ = _rich_reverse(checkpoint, True, 2)  # hg.estimators.reverse(checkpoint)
    v1, g1, _ = hg.estimators.reverse(checkpoint, hvp="forward")(task, phi, key)
    np.testing.assert_allclose(v1, v0, rtol=1e-13)
    for name in phi:
        assert np.max(np.abs(g0[name])) > 1e-8, name  # every kind has a gradient
        np.testing.assert_allclose(g1[name], g0[name], rtol=1e-10, atol=1e-14 * np.max(
            np.abs(g0[name])), err_msg=name)


def test_forward_over_reverse_hvp_against_central_differences():
    task = _rich_cnn_task()
    for est in (hg.estimators.reverse(hvp="forward"),
                hg.estimators.truncated(4, hvp="forward")):
        phi, key = task.space.init(), jax.random.key(0)
        _, g, _ = est(task, phi, key)
        if est.name == "reverse":  # hg.estimators.reverse(hvp="reverse")(task, phi, key)
            _, g_ref, _ = _rich_reverse("auto", False, 0)
        else:
            _, g_ref, _ = hg.estimators.truncated(4, hvp="reverse")(task, phi, key)
        for name in phi:
            np.testing.assert_allclose(g[name], g_ref[name], rtol=1e-10,
                                       atol=1e-14 * np.max(np.abs(g_ref[name])))
    # The space is not all scalars, so the directions are random ones over all of phi.
    records = hg.directional_errors(hg.estimators.reverse(hvp="forward"), task,
                                    task.space.init(), jax.random.key(0))
    assert len(records) >= 4
    for r in records:
        assert abs(r["analytic"]) > 1e-8, r
        assert r["rel_error"] <= 1e-6, r


@pytest.mark.parametrize("hvp_batch_size", [None, 6, 20])
def test_forward_over_reverse_hvp_with_adam_and_a_used_training_loss(hvp_batch_size):
    # Adam's update is not linear in the gradient, and here the objective also reads the
    # training losses, so the loss output's cotangent is not zero. The training loss has
    # a penalty that does not depend on the batch, which chunks must count once.
    task = logreg_task(steps=10).replace(
        optimizer=hg.inner.adam(), space=hg.HyperSpace({
            "learning_rate": hg.positive(0.05), "b1": hg.unit(0.8),
            "weight_decay": hg.positive(1e-2)}))
    data_loss = task.train_loss
    task = task.replace(train_loss=lambda p, h, b: data_loss(p, h, b) + 0.3 * jnp.sum(
        p["w"] ** 2))
    phi, key = task.space.init(), jax.random.key(0)

    def objective(t, hvp):
        def f(p):
            value, aux = hg.unroll.objective(t, p, key, hvp=hvp)
            return value + 0.1 * jnp.sum(aux["train_losses"])
        return jax.grad(f)(phi)

    g0 = objective(task, "reverse")
    g1 = objective(task.replace(hvp_batch_size=hvp_batch_size), "forward")
    for name in phi:
        assert abs(g0[name]) > 1e-6
        np.testing.assert_allclose(g1[name], g0[name], rtol=1e-11)


@pytest.mark.parametrize(("hvp_batch_size", "checkpoint"), [(3, None), (3, "nested"), (5, None)])
def test_chunked_hvp_equals_reverse_over_reverse(hvp_batch_size, checkpoint):
    # Batches of 10: chunks of 3 leave a remainder, 5 divide them.
    # The per-example weights are read through the batch's example ids, which the chunks
    # must keep aligned with the examples.
    task = _rich_cnn_task()
    phi = _moved(task.space.init())
    key = jax.random.key(2)
    v0, g0, _ = _rich_reverse(checkpoint, True, 2)  # hg.estimators.reverse(checkpoint)
    chunked = task.replace(hvp_batch_size=hvp_batch_size)
    v1, g1, _ = hg.estimators.reverse(checkpoint, hvp="forward")(chunked, phi, key)
    np.testing.assert_allclose(v1, v0, rtol=1e-13)
    for name in phi:
        assert np.max(np.abs(g0[name])) > 1e-8, name
        np.testing.assert_allclose(g1[name], g0[name], rtol=1e-10, atol=1e-14 * np.max(
            np.abs(g0[name])), err_msg=name)
    # Plain autodiff ignores the chunks: the same numbers, bit for bit.
    _, g2, _ = hg.estimators.reverse(checkpoint)(chunked, phi, key)
    for name in phi:
        np.testing.assert_array_equal(g2[name], g0[name])
    with pytest.raises(ValueError, match="hvp_batch_size must be a positive integer"):
        task.replace(hvp_batch_size=0)


def test_batch_mean_of_a_pytree():
    rng = np.random.default_rng(0)
    data = {"x": jnp.asarray(rng.standard_normal((23, 3))), "i": jnp.arange(23)}

    def fn(chunk):  # a mean over examples plus a term that does not depend on them
        return {"m": jnp.mean(chunk["x"], axis=0) + 1.5,
                "s": jnp.mean(chunk["x"][:, 0] * chunk["i"])}

    whole = fn(data)
    for size in (1, 4, 5, 23, 40, None):
        out = hg.inner.batch_mean(fn, data, size)
        for name in whole:
            np.testing.assert_allclose(out[name], whole[name], rtol=1e-13, err_msg=str(size))


def test_forward_over_reverse_hvp_refuses_differentiated_training_data():
    task = logreg_task(steps=3)
    phi, key = task.space.init(), jax.random.key(0)

    def f(x, hvp):
        t = task.replace(train_data=(x, task.train_data[1]))
        return hg.unroll.objective(t, phi, key, hvp=hvp)[0]

    assert np.all(np.isfinite(jax.grad(f)(task.train_data[0], "reverse")))
    with pytest.raises(ValueError, match="hvp='forward' does not differentiate the training"):
        jax.grad(f)(task.train_data[0], "forward")
    with pytest.raises(ValueError, match="hvp must be 'reverse', 'forward' or 'none'"):
        hg.estimators.reverse(hvp="both")


@pytest.mark.parametrize("val_batch_size", [7, 10, 100])
def test_chunked_validation_loss_changes_nothing(val_batch_size):
    # 30 validation examples: chunks that divide them, leave a remainder, or exceed them.
    task = _rich_cnn_task()
    phi, key = task.space.init(), jax.random.key(0)
    chunked = task.replace(val_batch_size=val_batch_size)
    v0, g0, _ = _rich_reverse("auto", False, 0)  # hg.estimators.reverse()(task, phi, key)
    v1, g1, _ = hg.estimators.reverse()(chunked, phi, key)
    np.testing.assert_allclose(v1, v0, rtol=1e-13)
    for name in phi:
        np.testing.assert_allclose(g1[name], g0[name], rtol=1e-10,
                                   atol=1e-14 * np.max(np.abs(g0[name])))
    with pytest.raises(ValueError, match="val_batch_size must be a positive integer"):
        task.replace(val_batch_size=0)
