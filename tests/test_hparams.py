import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hypergrad as hg


def test_round_trip_scalars_and_arrays():
    space = hg.HyperSpace({
        "learning_rate": hg.positive(0.1),
        "momentum": hg.unit(0.9),
        "slope": hg.bounded(0.25, 0.0, 1.0),
        "shift": hg.real(-3.0),
        "per_layer": hg.positive(np.array([0.1, 0.2, 0.3])),
    })
    phi = space.init()
    np.testing.assert_allclose(phi["learning_rate"], np.log(0.1), rtol=1e-15)
    np.testing.assert_allclose(phi["momentum"], np.log(0.9 / 0.1), rtol=1e-14)
    np.testing.assert_allclose(phi["slope"], np.log(0.25 / 0.75), rtol=1e-14)
    assert phi["per_layer"].shape == (3,)
    hparams = space.constrain(phi)
    for name, c in space.constraints.items():
        np.testing.assert_allclose(hparams[name], c.value, rtol=1e-14)
    back = space.unconstrain(hparams)
    for name in space.names:
        np.testing.assert_allclose(back[name], phi[name], rtol=1e-12, atol=1e-14)


def test_constrain_is_differentiable_and_stays_in_range():
    space = hg.HyperSpace({"a": hg.bounded(0.5, -2.0, 3.0), "b": hg.unit(0.3)})
    # d/dphi of low + w*sigmoid(phi) = w * s * (1 - s)
    g = jax.grad(lambda p: space.constrain(p)["a"])(space.init())
    s = (0.5 + 2.0) / 5.0
    assert g["a"] == pytest.approx(5.0 * s * (1 - s), rel=1e-12)
    for phi in (-50.0, 50.0):
        h = space.constrain({"a": jnp.asarray(phi), "b": jnp.asarray(phi)})
        assert -2.0 <= float(h["a"]) <= 3.0 and 0.0 <= float(h["b"]) <= 1.0


def test_init_dtype_follows_default_float():
    phi = hg.HyperSpace({"lr": hg.positive(0.1)}).init()
    assert phi["lr"].dtype == jnp.float64  # conftest turns on x64
    assert hg.HyperSpace({"lr": hg.positive(0.1)}).init(jnp.float32)["lr"].dtype == jnp.float32


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: hg.positive(-0.1), "lr must be > 0, got -0.1"),
        (lambda: hg.positive(0.0), "lr must be > 0"),
        (lambda: hg.unit(1.0), "lr must be strictly between 0 and 1"),
        (lambda: hg.bounded(2.0, 0.0, 1.0), "strictly between 0 and 1"),
        (lambda: hg.real(float("nan")), "lr must be finite"),
        (lambda: hg.positive(np.array([0.1, -1.0])), "entries in [-1, 0.1]"),
    ],
)
def test_bad_values_are_refused_by_name(make, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        hg.HyperSpace({"lr": make()})


def test_bounded_needs_an_interval():
    with pytest.raises(ValueError, match="low < high"):
        hg.bounded(0.5, 1.0, 0.0)


def test_with_values_checks_and_copies():
    space = hg.HyperSpace({"learning_rate": hg.positive(0.1)})
    new = space.with_values(learning_rate=0.5)
    assert new.constraints["learning_rate"].value == 0.5
    assert space.constraints["learning_rate"].value == 0.1
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        space.with_values(learning_rate=-1.0)
    with pytest.raises(KeyError, match="unknown hyperparameter"):
        space.with_values(momentum=0.5)


def test_summarize():
    out = hg.hparams.summarize({"a": jnp.asarray(0.5), "b": jnp.asarray([1.0, 3.0])})
    assert out == {"a": 0.5, "b": {"mean": 2.0, "min": 1.0, "max": 3.0}}


def test_space_rejects_plain_numbers():
    with pytest.raises(TypeError, match="declared with positive"):
        hg.HyperSpace({"lr": 0.1})


@pytest.mark.parametrize("make, message", [
    (lambda: hg.bounded(0.5, 0.0, float("inf")), "bounded() needs finite low and high, got "
                                                 "low=0, high=inf; use positive() for (0, inf)"),
    (lambda: hg.bounded(0.5, float("-inf"), float("inf")), "got low=-inf, high=inf; use"),
    (lambda: hg.HyperSpace({"lr": hg.positive(None)}),
     "lr must be a number or a non-empty array of numbers, got None"),
    (lambda: hg.HyperSpace({"lr": hg.positive("0.1")}), "got '0.1'"),
    (lambda: hg.HyperSpace({"lr": hg.positive(np.zeros(0))}), "got array([], dtype=float64)"),
    (lambda: hg.HyperSpace({"lr": hg.positive({"a": object()})}), "got {'a': <object"),
    (lambda: hg.HyperSpace({"lr": hg.positive(float("inf"))}), "lr must be > 0, got inf"),
    (lambda: hg.hparams.parse_schedule("x" * 100_000),
     "schedule must be one of constant, per_step, windows:K, linear, exponential, got 'xxx"),
])
def test_degenerate_declarations_are_a_clear_value_error(make, message):
    """Issue 21, item 22: each was -inf, NaN, or an error raised by the error message."""
    with pytest.raises(ValueError) as e:
        make()
    text = str(e.value)
    assert message in text and "\n" not in text and len(text) < 300, text[:400]


def tiny_task(**changes):
    x, y = jnp.ones((6, 2)), jnp.zeros(6, dtype=jnp.int32)

    def loss(p, hparams, batch):
        return jnp.mean((batch[0] @ p["w"]) ** 2)

    fields = dict(params={"w": jnp.ones(2)}, train_loss=loss, val_loss=loss,
                  train_data=(x, y), val_data=(x, y),
                  space=hg.HyperSpace({"learning_rate": hg.positive(0.1)}),
                  optimizer=hg.inner.sgd(), steps=2)
    return hg.Task(**{**fields, **changes})


@pytest.mark.parametrize("changes, message", [
    ({"train_data": (jnp.ones((6, 2)), jnp.asarray(1.0))},
     "train_data leaves must be arrays sharing one leading (example) axis, got shapes "
     "[(6, 2), ()]"),
    ({"val_data": 3.0}, "val_data leaves must be arrays sharing one leading"),
    ({"train_data": (jnp.ones((0, 2)), jnp.zeros(0))}, "train_data holds 0 examples"),
    ({"val_data": (jnp.ones((0, 2)), jnp.zeros(0))}, "val_data holds 0 examples"),
    ({"val_data": ()}, "val_data holds no arrays"),
])
def test_task_refuses_scalar_and_empty_data(changes, message):
    tiny_task()  # the unchanged task is fine
    with pytest.raises(ValueError) as e:
        tiny_task(**changes)
    assert message in str(e.value)
