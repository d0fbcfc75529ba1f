"""The small problems, configs, constants and helpers that the test modules share, kept
here so that no test module imports another (importing one would run its collection side
effects and make every pytest-xdist worker import modules it does not run)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

import hypergrad as hg
from hypergrad.cli import main
from hypergrad.config import Config
from hypergrad.experiment import Experiment, Problem


@dataclasses.dataclass(frozen=True)
class QuadConfig(Config):
    steps: int = 10
    meta_steps: int = 4
    strategy: str = "local"  # these tests watch one local run's guard and files
    learning_rate: float = 0.1
    nan_above: float = 10.0  # the validation loss is NaN for learning rates above this

    def space(self):
        return hg.HyperSpace({"learning_rate": hg.positive(self.learning_rate)})


def quad_build(config):
    a = jnp.diag(jnp.linspace(0.1, 1.0, 4))

    def loss(w, hparams, batch):
        return 0.5 * w @ (a @ w)

    def val_loss(w, hparams, batch):
        v = loss(w, hparams, batch)
        return jnp.where(hparams["learning_rate"] > config.nan_above, jnp.nan, v)

    task = hg.Task(params=jnp.ones(4), train_loss=loss, val_loss=val_loss,
                   train_data=jnp.zeros(1), val_data=jnp.zeros(1), space=config.space(),
                   optimizer=hg.inner.sgd(), steps=config.steps)

    def evaluate(params, hparams):
        return {"test_loss": loss(params, hparams, None), "test_accuracy": jnp.asarray(1.0)}

    return Problem(task, evaluate)


QUAD = Experiment("quad", QuadConfig(), quad_build, "a quadratic")


def template(work):
    from hypergrad.config import from_dict
    from hypergrad.experiment import estimator_for, get_experiment, outer_for
    from hypergrad.population import host
    from hypergrad.run import keys_for
    from hypergrad.tune import initial_state

    saved = json.loads((work / "config.json").read_text())
    experiment = get_experiment(saved.pop("experiment"))
    config = from_dict(experiment.config, saved)
    task = experiment.build(config).task
    return host(initial_state(task, estimator_for(config), outer_for(config),
                              key=keys_for(config), phi=task.space.init(np.float32)))


def assert_one_line_error(argv, message, capsys):
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own errors
        status = e.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("hypergrad: error:")
    return err


def logreg_task(steps=12, batch_size=20, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((60, 5))
    y = rng.integers(0, 3, 60)
    xv = rng.standard_normal((30, 5))
    yv = rng.integers(0, 3, 30)
    params = {"w": jnp.asarray(0.1 * rng.standard_normal((5, 3))), "b": jnp.zeros(3)}

    def loss(p, hparams, batch):
        xb, yb = batch
        logits = xb @ p["w"] + p["b"][None, :]
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], axis=1))

    space = hg.HyperSpace({"learning_rate": hg.positive(0.5), "momentum": hg.unit(0.5),
                           "weight_decay": hg.positive(1e-2)})
    return hg.Task(params=params, train_loss=loss, val_loss=loss,
                   train_data=(jnp.asarray(x), jnp.asarray(y)),
                   val_data=(jnp.asarray(xv), jnp.asarray(yv)),
                   space=space, optimizer=hg.inner.sgd(), steps=steps, batch_size=batch_size)


def counting(task):
    """``task`` with losses that count their traces, and the list they append to."""
    traces, base = [], task.train_loss

    def loss(p, hparams, batch):
        traces.append(1)
        return base(p, hparams, batch)

    return task.replace(train_loss=loss, val_loss=loss), traces


def tiny_cnn_task(conv="matmul"):
    from hypergrad.task import seed_cnn

    data = hg.data.load("digits", train_size=60, val_size=30, test_size=10,
                        dtype=jnp.float64)
    space = hg.HyperSpace({"learning_rate": hg.positive(0.1), "momentum": hg.unit(0.5),
                           "weight_decay": hg.positive(1e-3),
                           "leaky_slope": hg.bounded(0.1, 0.0, 1.0)})
    task, _ = seed_cnn(data, space, steps=8, batch_size=10, channels=(4, 4, 4), conv=conv,
                       dtype=jnp.float64)
    return task


def logreg(space, optimizer, steps=10, batch_size=20, dtype=jnp.float64):
    """Softmax regression on 60 random points: small enough to check every coordinate."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 5))
    y = rng.integers(0, 3, 60)
    xv = rng.standard_normal((30, 5))
    yv = rng.integers(0, 3, 30)
    params = {"w": jnp.asarray(0.1 * rng.standard_normal((5, 3)), dtype),
              "b": jnp.zeros(3, dtype)}

    def loss(p, hparams, batch):
        xb, yb = batch
        logits = xb @ p["w"] + p["b"][None, :]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=1))

    return hg.Task(params=params, train_loss=loss, val_loss=loss,
                   train_data=(jnp.asarray(x, dtype), jnp.asarray(y)),
                   val_data=(jnp.asarray(xv, dtype), jnp.asarray(yv)),
                   space=space, optimizer=optimizer, steps=steps, batch_size=batch_size)


def quadratic_task(nan_above=np.inf, steps=10):
    """GD on 0.5 w'Aw; the validation loss is the same, NaN above a learning rate."""
    a = jnp.diag(jnp.linspace(0.1, 1.0, 4))

    def loss(w, hparams, batch):
        return 0.5 * w @ (a @ w)

    def val_loss(w, hparams, batch):
        return jnp.where(hparams["learning_rate"] > nan_above, jnp.nan, loss(w, hparams, batch))

    return hg.Task(params=jnp.ones(4), train_loss=loss, val_loss=val_loss,
                   train_data=jnp.zeros(1), val_data=jnp.zeros(1),
                   space=hg.HyperSpace({"learning_rate": hg.positive(0.1)}),
                   optimizer=hg.inner.sgd(), steps=steps)


def ridge(lam, *, n=40, d=4, steps=3, lr=0.1, batch_size=None, at_optimum=True, seed=0):
    """Ridge regression, train loss ``mean (Xw - y)^2 + sum lam w^2``, and its exact
    hypergradient with respect to ``phi = log lam`` from ``w* = (X'X + n Lam)^-1 X'y``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = x @ rng.standard_normal(d) + 0.5 * rng.standard_normal(n)
    xv = rng.standard_normal((20, d))
    yv = xv @ rng.standard_normal(d)
    lam = np.asarray(lam, dtype=np.float64)
    m = x.T @ x + n * np.diag(np.broadcast_to(lam, (d,)))
    w_star = np.linalg.solve(m, x.T @ y)

    def train(w, hparams, batch):
        xb, yb = batch
        return jnp.mean((xb @ w - yb) ** 2) + jnp.sum(hparams["l2"] * w**2)

    def val(w, hparams, batch):
        xb, yb = batch
        return jnp.mean((xb @ w - yb) ** 2)

    task = hg.Task(params=jnp.asarray(w_star if at_optimum else np.zeros(d)),
                   train_loss=train, val_loss=val,
                   train_data=(jnp.asarray(x), jnp.asarray(y)),
                   val_data=(jnp.asarray(xv), jnp.asarray(yv)),
                   space=hg.HyperSpace({"l2": hg.positive(lam)}),
                   optimizer=hg.inner.sgd(learning_rate=lr), steps=steps,
                   batch_size=batch_size)
    g_val = 2 / len(yv) * xv.T @ (xv @ w_star - yv)
    dlam = -n * w_star * np.linalg.solve(m, g_val)  # d L_val / d lam_i
    exact = lam * (dlam if lam.ndim else dlam.sum())  # chain rule through lam = exp(phi)
    hessian = 2 / n * m
    return task, exact, hessian


ETA, STEPS, OMEGA = 0.2, 12, 3.0
C = np.array([0.3, -0.2])  # the validation loss's centre
XBAR = np.array([0.5, 1.0])  # the training data's mean
CLIFF = 0.5


def shift_task(kind="cos", steps=STEPS):
    """Gradient descent on ``0.5 |w - s - x|^2`` (mean over the data) from ``w = 0``.

    The trained weights are linear in the tuned shift ``s`` held at step t, ``s_t``:
    ``w_T = sum_t eta (1 - eta)^(T-1-t) (s_t + xbar)``. The validation loss is
    ``sum_j -cos(omega (w_j - c_j))`` (``kind="cos"``), ``0.5 |w - c|^2``
    (``kind="quadratic"``) or ``w_0 - c_0``, NaN from ``CLIFF`` on (``kind="cliff"``).
    """
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 2))
    x = x - x.mean(0) + XBAR

    def train(w, hparams, batch):
        return 0.5 * jnp.mean(jnp.sum(((w - hparams["shift"])[None] - batch) ** 2, axis=-1))

    def val(w, hparams, batch):
        if kind == "cos":
            return jnp.mean(jnp.sum(-jnp.cos(OMEGA * (w[None] - batch)), axis=-1))
        if kind == "cliff":  # diverges (NaN) past w_0 - c_0 = CLIFF
            u = w[None, 0] - batch[:, 0]
            return jnp.mean(jnp.where(u < CLIFF, u, jnp.nan))
        return 0.5 * jnp.mean(jnp.sum((w[None] - batch) ** 2, axis=-1))

    return hg.Task(params=jnp.zeros(2), train_loss=train, val_loss=val,
                   train_data=jnp.asarray(x), val_data=jnp.asarray(C[None]),
                   space=hg.HyperSpace({"shift": hg.real(np.array([0.1, -0.4]))}),
                   optimizer=hg.inner.sgd(learning_rate=ETA), steps=steps)


def weights(steps=STEPS):
    """``eta (1 - eta)^(T-1-t)`` for t < T: how much the shift at step t moves ``w_T``."""
    return ETA * (1 - ETA) ** (steps - 1 - np.arange(steps))


def smoothed_grad(s, sigma, spread, kind="cos", steps=STEPS):
    """The gradient in ``s`` of the validation loss averaged over perturbations that
    leave ``w_T`` Gaussian with standard deviation ``sigma * spread`` per coordinate."""
    a = weights(steps).sum()
    mu = a * (s + XBAR)
    if kind == "quadratic":
        return a * (mu - C)
    return OMEGA * a * np.sin(OMEGA * (mu - C)) * np.exp(-0.5 * (OMEGA * sigma * spread) ** 2)


def phi0(task):
    return task.space.init()
