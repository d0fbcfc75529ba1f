"""Granular, scheduled and non-optimizer hyperparameters: layouts, errors, and every kind's
reverse hypergradient against central differences in float64."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hypergrad as hg

EXACT = 1e-6
STEPS = 6


def data(n_train=24, n_val=20, features=12, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, features))

    def split(n):
        y = rng.integers(0, classes, n)
        x = centers[y] + 0.8 * rng.standard_normal((n, features))
        return jnp.asarray(x), jnp.asarray(y, dtype=jnp.int32)

    return SimpleNamespace(train=split(n_train), val=split(n_val))


def mlp_task(space, *, steps=STEPS, optimizer=None, batch_size=8, loss="mse", slope=0.1):
    model = hg.models.MLP(nnx.Rngs(0), sizes=(12, 7, 5, 3), param_dtype=jnp.float64)
    task, _ = hg.task.classification(model, data(), space, steps=steps, batch_size=batch_size,
                                     loss=loss, optimizer=optimizer, slope=slope)
    return task


def fd_error(task, est=None, directions=6):
    est = est or hg.estimators.reverse()
    return hg.check_hypergrad(est, task, task.space.init(), jax.random.key(3),
                              directions=directions)


SGD = {"learning_rate": 0.2, "momentum": 0.5, "weight_decay": 1e-2}


def sgd_space(**options):
    """The SGD space with ``options[name] = dict(per=..., schedule=...)``."""
    kinds = {"learning_rate": hg.positive, "momentum": hg.unit, "weight_decay": hg.positive}
    return hg.HyperSpace({n: kinds[n](v, **options.get(n, {})) for n, v in SGD.items()})


def by_depth(path):
    return "first" if path.startswith("layers/0") else "rest"


GRANULARITIES = {
    "global": None, "layer": "layer", "tensor": "tensor", "parameter": "parameter",
    "function": by_depth, "mapping": {"hidden": r"layers/[01]/", "out": r"layers/2/"},
}


@pytest.mark.parametrize("per", list(GRANULARITIES), ids=list(GRANULARITIES))
def test_sgd_hyperparameters_at_every_granularity(per):
    # All three at once: random directions mix every coordinate, so an error in any
    # one of them shows.
    per = GRANULARITIES[per]
    task = mlp_task(sgd_space(learning_rate={"per": per}, momentum={"per": per},
                              weight_decay={"per": per}))
    assert fd_error(task, directions=8) < EXACT


SCHEDULES = ["per_step", "windows:4", "linear", "exponential"]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedules_at_each_granularity(schedule):
    task = mlp_task(sgd_space(learning_rate={"per": "layer", "schedule": schedule},
                              momentum={"schedule": schedule},
                              weight_decay={"per": "parameter", "schedule": schedule}))
    assert fd_error(task, directions=8) < EXACT


def test_layouts_have_the_declared_shapes():
    space = hg.HyperSpace({
        "learning_rate": hg.positive(0.1, per="layer", schedule="per_step"),
        "momentum": hg.unit(0.5, schedule=hg.hparams.windows(4)),
        "weight_decay": hg.positive(1e-3, per="parameter"),
    })
    task = mlp_task(space, steps=10)
    phi = task.space.init()
    assert phi["learning_rate"].shape == (10, 3)  # T steps x 3 dense layers
    assert phi["momentum"].shape == (3,)  # ceil(10 / 4) windows
    shapes = jax.tree.map(jnp.shape, phi["weight_decay"])
    assert shapes == jax.tree.map(jnp.shape, task.params)
    layout = task.space.constraints["learning_rate"].layout
    assert layout.groups == ("layers/0", "layers/1", "layers/2")
    # At step t each leaf of the weights reads its layer's value at t.
    hparams = task.space.constrain(phi)
    hparams["learning_rate"] = hparams["learning_rate"] * jnp.arange(1.0, 11.0)[:, None]
    at = task.space.at_step(hparams, 7)
    assert float(at["learning_rate"]["layers"][1]["kernel"]) == pytest.approx(0.8)
    assert float(at["momentum"]) == pytest.approx(0.5)
    # Windows share a value: steps 4..7 read window 1.
    windows = task.space.step_values(hparams, jnp.arange(10))["momentum"]
    assert windows.shape == (10,)


def test_seed_cnn_per_layer_has_one_value_per_module():
    digits = hg.data.load("digits", seed=0, train_size=30, val_size=20, dtype=jnp.float64)
    space = hg.HyperSpace({"learning_rate": hg.positive(0.01, per="layer"),
                           "leaky_slope": hg.bounded(0.1, 0.0, 1.0, per="layer")})
    task, _ = hg.task.seed_cnn(digits, space, steps=3, channels=(2, 2, 2), batch_size=10)
    assert task.space.constraints["learning_rate"].layout.groups == (
        "convs/0", "convs/1", "convs/2", "head")
    # The slope acts after each convolution, not after the head.
    assert task.space.constraints["leaky_slope"].layout.groups == (
        "convs/0", "convs/1", "convs/2")


@pytest.mark.parametrize("schedule", [None, "linear", "exponential", "per_step"])
def test_values_stay_in_range_after_any_update(schedule):
    space = hg.HyperSpace({"momentum": hg.unit(0.5, per="layer", schedule=schedule),
                           "learning_rate": hg.positive(0.1, per="parameter",
                                                        schedule=schedule)})
    task = mlp_task(space)
    phi = task.space.init()
    for shift in (-80.0, 80.0):
        moved = jax.tree.map(lambda p, s=shift: p + s * jnp.linspace(-1, 1, p.size)
                             .reshape(p.shape), phi)
        at = task.space.step_values(task.space.constrain(moved), jnp.arange(STEPS))
        hp = {**task.space.constrain(moved), **at}
        mom = np.asarray(hp["momentum"])
        assert np.all((mom >= 0) & (mom <= 1))
        assert all(np.all(np.asarray(v) >= 0) for v in jax.tree.leaves(hp["learning_rate"]))


ADAM = {"learning_rate": 0.05, "b1": 0.8, "b2": 0.9, "eps": 1e-3, "weight_decay": 1e-2}


@pytest.mark.parametrize("name", list(ADAM))
def test_adam_hyperparameters(name):
    kinds = {"learning_rate": hg.positive, "b1": hg.unit, "b2": hg.unit, "eps": hg.positive,
             "weight_decay": hg.positive}
    fixed = {k: v for k, v in ADAM.items() if k != name}
    space = hg.HyperSpace({name: kinds[name](ADAM[name])})
    task = mlp_task(space, optimizer=hg.inner.adam(**fixed))
    assert fd_error(task) < EXACT


def test_adam_with_per_layer_per_step_learning_rate_and_all_five():
    kinds = {"learning_rate": hg.positive, "b1": hg.unit, "b2": hg.unit, "eps": hg.positive,
             "weight_decay": hg.positive}
    decl = {n: kinds[n](v) for n, v in ADAM.items()}
    decl["learning_rate"] = hg.positive(0.05, per="layer", schedule="per_step")
    task = mlp_task(hg.HyperSpace(decl), optimizer=hg.inner.adam())
    assert fd_error(task) < EXACT


def test_adam_matches_optax_adamw():
    import optax

    task = mlp_task(hg.HyperSpace({"learning_rate": hg.positive(0.05)}),
                    optimizer=hg.inner.adam(b1=0.8, b2=0.9, eps=1e-3, weight_decay=1e-2))
    opt = optax.adamw(0.05, b1=0.8, b2=0.9, eps=1e-3, weight_decay=1e-2)
    params, state = task.params, opt.init(task.params)
    ours = task.optimizer.init(params)
    hparams = task.space.constrain(task.space.init())
    for i in range(3):
        grads = jax.tree.map(lambda w, i=i: jnp.cos(w * (i + 1)), params)
        ref, state = opt.update(grads, state, params)
        got, ours = task.optimizer.update(grads, ours, params, hparams)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
        params = optax.apply_updates(params, ref)


@pytest.mark.parametrize("per", [None, "layer"])
def test_leaky_slope_global_and_per_layer(per):
    space = sgd_space()
    space = hg.HyperSpace({**space.constraints,
                           "leaky_slope": hg.bounded(0.1, 0.0, 1.0, per=per)})
    assert fd_error(mlp_task(space)) < EXACT


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_loss_mix_and_label_smoothing(loss):
    space = hg.HyperSpace({"loss_mix": hg.unit(0.3), "label_smoothing": hg.unit(0.1)})
    task = mlp_task(space, loss=loss, optimizer=hg.inner.sgd(0.2, 0.5))
    assert fd_error(task) < EXACT


def test_loss_mix_interpolates_the_two_losses():
    def trained_loss(m):
        space = hg.HyperSpace({"loss_mix": hg.unit(m)})
        task = mlp_task(space, optimizer=hg.inner.sgd(0.2))
        batch = task.train_data
        return float(task.train_loss(task.params, {"loss_mix": m}, batch))

    mse = mlp_task(hg.HyperSpace({"learning_rate": hg.positive(0.2)}), loss="mse")
    ce = mlp_task(hg.HyperSpace({"learning_rate": hg.positive(0.2)}), loss="ce")
    h = {"learning_rate": 0.2}
    a = float(mse.train_loss(mse.params, h, mse.train_data))
    b = float(ce.train_loss(ce.params, h, ce.train_data))
    assert trained_loss(0.25) == pytest.approx(0.75 * a + 0.25 * b, rel=1e-12)


@pytest.mark.parametrize("per", [None, "layer", "parameter"])
def test_init_scale_through_the_initializer(per):
    space = hg.HyperSpace({"init_scale": hg.positive(1.0, per=per),
                           "learning_rate": hg.positive(0.2)})
    task = mlp_task(space)
    assert callable(task.params)
    assert fd_error(task) < EXACT
    # Scale 1 is the model's own initialization.
    base = mlp_task(hg.HyperSpace({"learning_rate": hg.positive(0.2)}))
    hparams = task.space.constrain(task.space.init())
    for a, b in zip(jax.tree.leaves(task.init_params(jax.random.key(0), hparams)),
                    jax.tree.leaves(base.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_example_weights_for_data_hyper_cleaning():
    space = hg.HyperSpace({"example_weight": hg.real(np.zeros(24))})
    task = mlp_task(space, optimizer=hg.inner.sgd(0.2, 0.5))
    _, grad, _ = hg.estimators.reverse()(task, task.space.init(), jax.random.key(3))
    assert grad["example_weight"].shape == (24,)
    assert fd_error(task) < EXACT
    # With every weight at sigmoid(0) = 1/2 the training loss is half the unweighted one.
    plain = mlp_task(hg.HyperSpace({"learning_rate": hg.positive(0.2)}))
    w = float(task.train_loss(task.params, {"example_weight": jnp.zeros(24)}, task.train_data))
    u = float(plain.train_loss(plain.params, {"learning_rate": 0.2}, plain.train_data))
    assert w == pytest.approx(u / 2, rel=1e-12)


@pytest.mark.parametrize("make", [
    lambda: hg.estimators.reverse(checkpoint=2),
    lambda: hg.estimators.reverse(checkpoint="nested"),
    lambda: hg.estimators.forward(),
    lambda: hg.estimators.truncated(window=STEPS),
], ids=["checkpoint-2", "nested", "forward", "truncated-full"])
def test_every_estimator_reads_schedules_alike(make):
    task = mlp_task(sgd_space(learning_rate={"per": "layer", "schedule": "per_step"},
                              weight_decay={"per": "parameter"}))
    phi, key = task.space.init(), jax.random.key(3)
    value, grad, _ = hg.estimators.reverse()(task, phi, key)
    v2, g2, _ = make()(task, phi, key)
    np.testing.assert_allclose(v2, value, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(grad), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13)


def test_summaries_are_per_group():
    space = hg.HyperSpace({"learning_rate": hg.positive(0.1, per="layer", schedule="linear"),
                           "weight_decay": hg.positive(1e-3, per="parameter"),
                           "momentum": hg.unit(0.5)})
    task = mlp_task(space)
    summary = task.space.summarize(task.space.constrain(task.space.init()))
    assert summary["momentum"] == pytest.approx(0.5)
    assert set(summary["learning_rate"]["groups"]) == {"layers/0", "layers/1", "layers/2"}
    assert summary["learning_rate"]["mean"] == pytest.approx(0.1)
    assert "layers/2/bias" in summary["weight_decay"]["groups"]
    arrays = task.space.arrays(task.space.constrain(task.space.init()))
    assert arrays["learning_rate@steps"].shape == (STEPS, 3)
    assert list(arrays["learning_rate@groups"]) == ["layers/0", "layers/1", "layers/2"]
    assert arrays["weight_decay/layers/0/kernel"].shape == (12, 7)


def test_clear_errors():
    with pytest.raises(ValueError, match="never reads"):
        mlp_task(hg.HyperSpace({"learning_rate": hg.positive(0.1), "temperature": hg.unit(0.1)}))
    with pytest.raises(ValueError, match="group 'late' matches no parameter"):
        mlp_task(hg.HyperSpace({"learning_rate": hg.positive(
            0.1, per={"all": "layers", "late": "conv"})}))
    with pytest.raises(ValueError, match="matches no group"):
        mlp_task(hg.HyperSpace({"learning_rate": hg.positive(0.1, per={"a": "layers/0/"})}))
    with pytest.raises(ValueError, match="schedule must be one of"):
        hg.positive(0.1, schedule="cosine")
    with pytest.raises(ValueError, match="per must be one of"):
        hg.positive(0.1, per="neuron")
    with pytest.raises(ValueError, match="exponential schedule needs a positive"):
        hg.real(0.1, schedule="exponential")
    with pytest.raises(ValueError, match="does not fit its layout"):
        mlp_task(hg.HyperSpace({"learning_rate": hg.positive(np.ones(5), per="layer")}))
    with pytest.raises(ValueError, match="resolve the space"):
        unresolved = hg.HyperSpace({"learning_rate": hg.positive(0.1, per="layer")})
        unresolved.expand(unresolved.constrain(unresolved.init()))
    with pytest.raises(ValueError, match="example_weight needs one value per training"):
        mlp_task(hg.HyperSpace({"example_weight": hg.real(np.zeros(3))}))
    with pytest.raises(ValueError, match="schedule of learning_rate"):
        hg.estimators.implicit()(
            mlp_task(hg.HyperSpace({"learning_rate": hg.positive(0.1, schedule="per_step"),
                                    "leaky_slope": hg.unit(0.1)})),
            None, jax.random.key(0))
