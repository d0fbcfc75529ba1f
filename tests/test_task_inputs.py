"""What a Task takes beyond its data (issue 33): an explicit minibatch order and a
starting optimizer state (HIPS's in-order batches with a nonzero starting velocity, an
optax RMSProp state carried from one run into the next), each against an exact answer
and neither compiling again for new values; and meta-losses along the training run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hypergrad as hg

N, D, T, B = 12, 3, 6, 2
RNG = np.random.default_rng(0)
X, Y = RNG.standard_normal((N, D)), RNG.standard_normal(N)
XV, YV = RNG.standard_normal((5, D)), RNG.standard_normal(5)
W0 = RNG.standard_normal(D)
V0 = RNG.standard_normal(D)  # the starting velocity
IN_ORDER = np.arange(T * B).reshape(T, B) % N
LR, MU = 0.1, 0.7


def mse(w, batch):
    x, y = batch
    return 0.5 * jnp.mean((x @ w - y) ** 2)


def hips_task(batches=IN_ORDER, velocity=V0, traces=None):
    def train(w, hp, batch):
        if traces is not None:
            traces.append(1)  # runs once per trace, not per call
        return mse(w, batch)

    space = hg.HyperSpace({"learning_rate": hg.positive(LR), "momentum": hg.unit(MU)})
    opt_state = hg.inner.SgdState(jnp.asarray(velocity))
    return hg.Task(params=jnp.asarray(W0), train_loss=train,
                   val_loss=lambda w, hp, b: mse(w, b), train_data=(X, Y), val_data=(XV, YV),
                   space=space, optimizer=hg.inner.sgd(), steps=T,
                   batches=np.asarray(batches), opt_state=opt_state)


def by_hand(lr, mu, batches=IN_ORDER, v0=V0):
    """HIPS's loop written out: v <- mu v + g(w, batch_t); w <- w - lr v."""
    w, v = W0.copy(), v0.copy()
    for idx in batches:
        x, y = X[idx], Y[idx]
        v = mu * v + x.T @ (x @ w - y) / len(idx)
        w = w - lr * v
    return 0.5 * np.mean((XV @ w - YV) ** 2)


def test_in_order_batches_and_a_starting_velocity_train_as_written_out():
    task = hips_task()
    assert task.batch_size == B
    value, aux = hg.unroll.objective(task, task.space.init(), jax.random.key(3))
    np.testing.assert_allclose(value, by_hand(LR, MU), rtol=1e-13)
    other = IN_ORDER[::-1]
    value, _ = hg.unroll.objective(hips_task(batches=other), task.space.init(),
                                   jax.random.key(3))
    np.testing.assert_allclose(value, by_hand(LR, MU, other), rtol=1e-13)


@pytest.mark.parametrize("estimator", ["reverse", "forward", "reversible"])
def test_hypergradients_with_a_given_order_and_velocity_match_central_differences(estimator):
    task = hips_task()
    phi = task.space.init()
    value, grad, _ = hg.estimators.by_name(estimator)(task, phi, jax.random.key(0))
    h = 1e-5
    for name, natural in (("learning_rate", LR), ("momentum", MU)):
        # d/dphi of the loop written out, phi = log lr and logit mu.
        if name == "learning_rate":
            f = lambda p: by_hand(np.exp(p), MU)  # noqa: E731
            p = np.log(natural)
        else:
            f = lambda p: by_hand(LR, 1 / (1 + np.exp(-p)))  # noqa: E731
            p = np.log(natural / (1 - natural))
        fd = (f(p + h) - f(p - h)) / (2 * h)
        tol = 1e-6 if estimator != "reversible" else 1e-5  # exact on a 2**-k grid
        np.testing.assert_allclose(grad[name], fd, rtol=tol)
    np.testing.assert_allclose(value, by_hand(LR, MU), rtol=1e-6)


def test_the_gradient_with_respect_to_the_starting_velocity():
    """The starting state is a leaf of the task: jax.grad gives its gradient (the task
    holds the integer batch order too, hence allow_int)."""
    task = hips_task()
    phi = task.space.init()
    grads = jax.grad(lambda t: hg.unroll.objective(t, phi, jax.random.key(0))[0],
                     allow_int=True)(task)
    h = 1e-6
    for i in range(D):
        e = np.eye(D)[i] * h
        fd = (by_hand(LR, MU, v0=V0 + e) - by_hand(LR, MU, v0=V0 - e)) / (2 * h)
        np.testing.assert_allclose(grads.opt_state.velocity[i], fd, rtol=1e-7)


def test_a_new_order_or_starting_state_does_not_compile_again():
    traces = []
    task = hips_task(traces=traces)
    other = task.replace(batches=IN_ORDER[::-1], opt_state=hg.inner.SgdState(-V0))
    estimator = jax.jit(hg.estimators.reverse())
    phi = task.space.init()
    first = estimator(task, phi, jax.random.key(0))[0]
    after_first = len(traces)
    second = estimator(other, phi, jax.random.key(0))[0]
    assert after_first > 0 and len(traces) == after_first
    np.testing.assert_allclose(second, by_hand(LR, MU, IN_ORDER[::-1], -V0), rtol=1e-13)
    assert first != second


def test_an_rmsprop_state_carried_from_one_run_into_the_next():
    """optax's meta-learning notebook carries the optimizer state across unrolls: two
    runs of T/2 steps, the second from the first's weights and RMSProp state, train as
    one run of T steps."""
    space = hg.HyperSpace({"learning_rate": hg.positive(0.05)})
    whole = hg.Task(params=jnp.asarray(W0), train_loss=lambda w, hp, b: mse(w, b),
                    val_loss=lambda w, hp, b: mse(w, b), train_data=(X, Y),
                    val_data=(XV, YV), space=space,
                    optimizer=hg.inner.from_optax(optax.rmsprop, learning_rate=0.05),
                    steps=T, batches=IN_ORDER)
    hparams = space.constrain(whole.space.init())
    key = jax.random.key(0)
    end, _ = hg.unroll.train(whole, hparams, key)
    first = whole.replace(steps=T // 2, batches=IN_ORDER[: T // 2])
    middle, _ = hg.unroll.train(first, first.space.constrain(first.space.init()), key)
    second = first.replace(params=middle.params, opt_state=middle.opt_state,
                           batches=IN_ORDER[T // 2:])
    assert jax.tree.leaves(middle.opt_state)  # a real state, not an empty one
    last, _ = hg.unroll.train(second, second.space.constrain(second.space.init()), key)
    np.testing.assert_allclose(last.params, end.params, rtol=1e-13)


def test_bad_orders_and_states_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"batches must be integers shaped \[steps, batch\]"):
        hips_task(batches=IN_ORDER[:-1])
    with pytest.raises(ValueError, match="train_data has 12 examples"):
        hips_task(batches=IN_ORDER + N)
    with pytest.raises(ValueError, match="batch_size=3 but batches has 2 examples per step"):
        hips_task().replace(batch_size=3)
    with pytest.raises(ValueError, match="opt_state is not shaped as the sgd optimizer's"):
        hips_task().replace(opt_state={"velocity": jnp.asarray(V0)})
    with pytest.raises(ValueError, match=r"opt_state has a leaf of shape \(2,\)"):
        hips_task(velocity=V0[:2])


def test_hips_momentum_form_is_sgd_with_mapped_hyperparameters():
    """HIPS writes momentum as ``V <- b V - (1 - b) g; W <- W + a V``. With
    ``v = -V / (1 - b)`` that is ``v <- b v + g; W <- W - a (1 - b) v``: hypergrad's sgd
    at ``learning_rate = a (1 - b)``, ``momentum = b``, starting velocity
    ``-V0 / (1 - b)``. The reversible estimator's hypergradient in (a, b) follows by the
    chain rule; checked against central differences of HIPS's loop (V0 = 0, as in HIPS's
    ``sgd``, so the start does not depend on b)."""
    a, b = 0.2, 0.6

    def hips(a, b):
        w, v = W0.copy(), np.zeros(D)
        for idx in IN_ORDER:
            x, y = X[idx], Y[idx]
            v = b * v - (1 - b) * x.T @ (x @ w - y) / len(idx)
            w = w + a * v
        return 0.5 * np.mean((XV @ w - YV) ** 2)

    task = hips_task(velocity=np.zeros(D))
    phi = task.space.unconstrain({"learning_rate": a * (1 - b), "momentum": b})
    value, grad, aux = hg.estimators.reversible()(task, phi, jax.random.key(0))
    assert bool(aux["exact"])
    np.testing.assert_allclose(value, hips(a, b), rtol=1e-6)
    lr, mu = a * (1 - b), b
    d_lr = grad["learning_rate"] / lr  # phi = log lr
    d_mu = grad["momentum"] / (mu * (1 - mu))  # phi = logit mu
    h = 1e-6
    np.testing.assert_allclose(d_lr * (1 - b), (hips(a + h, b) - hips(a - h, b)) / (2 * h),
                               rtol=1e-5)
    np.testing.assert_allclose(d_mu - d_lr * a, (hips(a, b + h) - hips(a, b - h)) / (2 * h),
                               rtol=1e-5)


def along_by_hand(lr, mu, meta_loss):
    """The HIPS loop's meta-loss along the run: the mean batch loss before each step
    (``"train_mean"``), or the mean validation loss after the given steps."""
    w, v = W0.copy(), V0.copy()
    train, val = [], []
    for idx in IN_ORDER:
        x, y = X[idx], Y[idx]
        train.append(0.5 * np.mean((x @ w - y) ** 2))
        v = mu * v + x.T @ (x @ w - y) / len(idx)
        w = w - lr * v
        val.append(0.5 * np.mean((XV @ w - YV) ** 2))
    if meta_loss == "train_mean":
        return np.mean(train)
    return np.mean([val[t - 1] for t in meta_loss])


@pytest.mark.parametrize("meta_loss", ["train_mean", (2, 5), (1, 3, 6)])
@pytest.mark.parametrize("estimator", ["reverse", "forward"])
def test_meta_losses_along_the_run_against_central_differences(meta_loss, estimator):
    task = hips_task().replace(meta_loss=meta_loss)
    value, grad, _ = hg.estimators.by_name(estimator)(task, task.space.init(),
                                                      jax.random.key(0))
    np.testing.assert_allclose(value, along_by_hand(LR, MU, meta_loss), rtol=1e-13)
    h = 1e-5
    fd_lr = (along_by_hand(LR * np.exp(h), MU, meta_loss)
             - along_by_hand(LR * np.exp(-h), MU, meta_loss)) / (2 * h)
    logit = np.log(MU / (1 - MU))
    mu = lambda p: 1 / (1 + np.exp(-p))  # noqa: E731
    fd_mu = (along_by_hand(LR, mu(logit + h), meta_loss)
             - along_by_hand(LR, mu(logit - h), meta_loss)) / (2 * h)
    np.testing.assert_allclose(grad["learning_rate"], fd_lr, rtol=1e-6)
    np.testing.assert_allclose(grad["momentum"], fd_mu, rtol=1e-6)


def test_es_and_pes_estimate_the_mean_training_loss_gradient():
    """learned_optimization's ES/PES meta-loss, the training loss averaged over the run:
    quadratic in the shift here, so both estimate its plain gradient (reverse's)."""
    from tests.problems import shift_task

    task = shift_task("quadratic").replace(meta_loss="train_mean")
    phi, key = task.space.init(), jax.random.key(5)
    _, exact, _ = hg.estimators.reverse()(task, phi, key)
    exact = np.asarray(exact["shift"])
    _, grad, aux = jax.jit(hg.estimators.es(0.5, 3000))(task, phi, key)
    se = np.asarray(aux["stderr"]["shift"])
    assert np.all(np.abs(np.asarray(grad["shift"]) - exact) < 4.5 * se), (grad, exact, se)
    # PES sums three windows' estimates, each weighted 4/12; its stderr is the last
    # window's (unweighted), which is larger than the sum's here.
    value, grad, aux = jax.jit(hg.estimators.pes(0.5, 3000, window=4))(task, phi, key)
    se = np.asarray(aux["stderr"]["shift"])
    assert np.all(np.abs(np.asarray(grad["shift"]) - exact) < 4.5 * se), (grad, exact, se)
    assert np.all(np.abs(np.asarray(grad["shift"]) - exact) < 0.1 * np.abs(exact))


def test_estimators_of_the_final_loss_refuse_a_meta_loss_along_the_run():
    task = hips_task().replace(meta_loss="train_mean")
    for name in ("truncated", "reversible", "implicit"):
        estimator = hg.estimators.by_name(name, window=2) if name == "truncated" \
            else hg.estimators.by_name(name)
        with pytest.raises(ValueError, match=f"{name} differentiates the validation loss "
                                             "after the last step only"):
            estimator(task, task.space.init(), jax.random.key(0))
    with pytest.raises(ValueError, match="pes differentiates"):
        hg.estimators.pes(0.1, 2, window=3)(task.replace(meta_loss=(2, 4)),
                                            task.space.init(), jax.random.key(0))
    for bad in ("mean", (0, 3), (3, 3), (7,), (2.5,), ()):
        with pytest.raises(ValueError, match=r"meta_loss must be 'final', 'train_mean' or "
                                             r"distinct step counts in \[1, 6\]"):
            task.replace(meta_loss=bad)
