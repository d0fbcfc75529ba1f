"""Tests for hypergrad.models: conv forms, the functional split, slope gradients, losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hypergrad import models

F64 = jnp.float64


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, F64)


def _labels(seed, n, k=10):
    return jax.random.randint(jax.random.key(seed), (n,), 0, k)


# --------------------------------------------------------------------------------------
# Conv3x3: matmul and native forms


@pytest.mark.parametrize("cin,cout,hw", [(1, 8, (8, 8)), (3, 5, (6, 7))])
def test_conv_forms_agree_in_value_and_gradient(cin, cout, hw):
    conv = {c: models.Conv3x3(cin, cout, rngs=nnx.Rngs(0), conv=c, param_dtype=F64)
            for c in ("matmul", "native")}
    fns = {c: models.functional(m) for c, m in conv.items()}
    params = fns["matmul"].params
    # Same parameters in both forms; give the bias a nonzero value to exercise it.
    jax.tree.map(np.testing.assert_array_equal, params, fns["native"].params)
    params = {**params, "bias": _normal(1, (cout,))}
    x = _normal(2, (2, *hw, cin))
    cot = _normal(3, (2, *hw, cout))

    @jax.jit
    def value_and_grads(params, x):
        def f(c):
            return jax.value_and_grad(lambda p, x: jnp.sum(cot * fns[c].apply(p, x)),
                                      argnums=(0, 1))(params, x)
        return f("matmul"), f("native")

    (v_m, (gp_m, gx_m)), (v_n, (gp_n, gx_n)) = value_and_grads(params, x)
    np.testing.assert_allclose(v_m, v_n, rtol=0, atol=1e-12)
    np.testing.assert_allclose(gx_m, gx_n, rtol=0, atol=1e-12)
    np.testing.assert_allclose(gp_m["kernel"], gp_n["kernel"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(gp_m["bias"], gp_n["bias"], rtol=0, atol=1e-12)


def test_conv_init_matches_nnx_conv():
    ours = models.Conv3x3(2, 4, rngs=nnx.Rngs(3), param_dtype=F64)
    ref = nnx.Conv(2, 4, kernel_size=(3, 3), rngs=nnx.Rngs(3), param_dtype=F64)
    np.testing.assert_array_equal(ours.kernel[...], ref.kernel[...])
    np.testing.assert_array_equal(ours.bias[...], ref.bias[...])


def test_conv_option():
    # auto: the matmul form on CPU at every size; on an accelerator up to 8x8 (measured
    # faster there), the native convolution above.
    for shape in ((8, 8), (28, 28), (32, 32)):
        assert models.conv_form("auto", shape, "cpu") == "matmul"
    assert models.conv_form("auto", (8, 8), "gpu") == "matmul"
    assert models.conv_form("auto", (28, 28), "gpu") == "native"
    assert models.conv_form("native", (8, 8), "cpu") == "native"
    assert models.conv_form("matmul", (28, 28), "gpu") == "matmul"
    with pytest.raises(ValueError, match="'auto', 'matmul' or 'native'"):
        models.Conv3x3(1, 2, rngs=nnx.Rngs(0), conv="fft")


# --------------------------------------------------------------------------------------
# SeedCNN


@pytest.mark.parametrize("h,w,c", [(8, 8, 1), (28, 28, 1), (32, 32, 3)])
def test_seed_cnn_shapes_and_conv_forms(h, w, c):
    x = _normal(0, (3, h, w, c))
    fns = {conv: models.functional(models.SeedCNN(
        nnx.Rngs(0), in_channels=c, image_shape=(h, w), conv=conv, param_dtype=F64))
        for conv in ("matmul", "native")}
    params = fns["native"].params

    @jax.jit
    def logits(x):
        # Flat rows reshape to the image.
        flat = fns["native"].apply(params, x.reshape(3, -1), 0.1)
        return {conv: f.apply(params, x, 0.1) for conv, f in fns.items()}, flat

    out, flat = logits(x)
    for y in out.values():
        assert y.shape == (3, 10) and y.dtype == F64
    np.testing.assert_allclose(out["matmul"], out["native"], rtol=0, atol=1e-10)
    np.testing.assert_array_equal(flat, out["native"])


def test_seed_cnn_slope_zero_is_relu():
    model = models.SeedCNN(nnx.Rngs(0), conv="native", param_dtype=F64)
    apply, params = models.functional(model)
    x = _normal(1, (4, 8, 8, 1))

    @jax.jit
    def relu_cnn(params, h):
        for layer in params["convs"].values():
            h = jax.lax.conv_general_dilated(h, layer["kernel"], (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            h = jax.nn.relu(h + layer["bias"].reshape(1, 1, 1, -1))
        return h.reshape(4, -1) @ params["head"]["kernel"] + params["head"]["bias"][None]

    np.testing.assert_allclose(jax.jit(apply)(params, x, 0.0), relu_cnn(params, x),
                               rtol=1e-14, atol=1e-14)
    np.testing.assert_array_equal(models.leaky_relu(x, 0.0), jax.nn.relu(x))


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_slope_gradient_matches_central_differences(loss):
    apply, params = models.functional(models.SeedCNN(nnx.Rngs(0), param_dtype=F64))
    x, y = _normal(1, (6, 8, 8, 1)), _labels(2, 6)
    loss_fn = models.loss_by_name(loss)

    def f(slope):
        return loss_fn(apply(params, x, slope), y)

    @jax.jit
    def check(slope, eps):
        fd = (f(slope + eps) - f(slope - eps)) / (2 * eps)
        _, tangent = jax.jvp(f, (slope,), (jnp.ones_like(slope),))
        return jax.grad(f)(slope), fd, tangent

    grad, fd, tangent = check(jnp.asarray(0.1, F64), 1e-5)
    assert abs(grad - fd) <= 1e-6 * abs(fd)
    # Forward mode agrees with reverse mode.
    np.testing.assert_allclose(tangent, grad, rtol=1e-12)


def test_init_is_deterministic_and_dtype_follows_param_dtype():
    def params(seed, **kw):
        return models.functional(models.SeedCNN(nnx.Rngs(seed), **kw)).params

    jax.tree.map(np.testing.assert_array_equal, params(0), params(0))
    assert not np.array_equal(params(0)["head"]["kernel"], params(1)["head"]["kernel"])
    assert {a.dtype for a in jax.tree.leaves(params(0))} == {jnp.dtype(jnp.float32)}
    assert {a.dtype for a in jax.tree.leaves(params(0, param_dtype=F64))} == {jnp.dtype(F64)}


def test_float32_model_stays_float32_with_a_float64_slope():
    apply, params = models.functional(models.SeedCNN(nnx.Rngs(0)))
    x = jnp.ones((2, 8, 8, 1), jnp.float32)
    slope = jnp.asarray(0.1, F64)
    assert jax.eval_shape(apply, params, x, slope).dtype == jnp.float32
    grad = jax.eval_shape(jax.grad(lambda s: jnp.sum(apply(params, x, s))), slope)
    assert grad.dtype == F64


# --------------------------------------------------------------------------------------
# functional


def test_functional_params_are_a_plain_dict_keyed_by_module_path():
    model = models.SeedCNN(nnx.Rngs(0), param_dtype=F64)
    apply, params = models.functional(model)
    assert type(params) is dict and set(params) == {"convs", "head"}
    assert type(params["convs"]) is dict and set(params["convs"]) == {0, 1, 2}
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(params))
    paths = {jax.tree_util.keystr(p, simple=True, separator="/")
             for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    assert paths == {"convs/0/kernel", "convs/0/bias", "convs/1/kernel", "convs/1/bias",
                     "convs/2/kernel", "convs/2/bias", "head/kernel", "head/bias"}
    assert params["convs"][1]["kernel"].shape == (3, 3, 8, 16)
    assert params["head"]["kernel"].shape == (8 * 8 * 16, 10)
    x = _normal(1, (2, 8, 8, 1))
    np.testing.assert_array_equal(jax.jit(apply)(params, x, 0.1),
                                  nnx.jit(lambda m, x: m(x, 0.1))(model, x))
    with pytest.raises(ValueError, match="structure"):
        apply({"head": params["head"]}, x, 0.1)


def test_apply_under_jit_and_inside_scan():
    apply, params = models.functional(
        models.MLP(nnx.Rngs(0), sizes=(64, 16, 10), param_dtype=F64))
    x, y = _normal(1, (5, 8, 8, 1)), _labels(2, 5)

    def loss(p, slope):
        return models.onehot_mse(apply(p, x, slope), y)

    def step(p, lr, slope):
        g = jax.grad(loss)(p, slope)
        return jax.tree.map(lambda w, g: w - lr * g, p, g)

    def train(lr, slope):
        p, _ = jax.lax.scan(lambda p, _: (step(p, lr, slope), None), params, length=3)
        return loss(p, slope)

    @jax.jit
    def run(lr, slope):
        p = params
        for _ in range(3):
            p = step(p, lr, slope)
        return train(lr, slope), loss(p, slope), jax.grad(train, argnums=(0, 1))(lr, slope)

    scanned, unrolled, hypergrads = run(jnp.asarray(0.05, F64), jnp.asarray(0.1, F64))
    np.testing.assert_allclose(scanned, unrolled, rtol=1e-12)
    # Hypergradients w.r.t. learning rate and slope through the scan are finite and nonzero.
    assert all(jnp.isfinite(g) and g != 0 for g in hypergrads)


# --------------------------------------------------------------------------------------
# MLP and logistic regression


def test_mlp_shapes():
    model = models.MLP(nnx.Rngs(0), sizes=(64, 20, 30, 10), param_dtype=F64)
    apply, params = models.functional(model)
    assert set(params["layers"]) == {0, 1, 2}
    assert params["layers"][1]["kernel"].shape == (20, 30)
    x = _normal(1, (7, 8, 8))
    out = jax.jit(apply)(params, x, 0.1)
    assert out.shape == (7, 10) and out.dtype == F64
    # The slope matters between layers.
    assert not np.allclose(out, jax.jit(apply)(params, x, 0.5))


def test_logistic_regression_shapes_and_ignores_slope():
    model = models.LogisticRegression(nnx.Rngs(0), in_features=64, num_classes=10,
                                      param_dtype=F64)
    apply, params = models.functional(model)
    assert params["linear"]["kernel"].shape == (64, 10)
    x = _normal(1, (7, 8, 8, 1))
    out = jax.jit(apply)(params, x, 0.3)
    assert out.shape == (7, 10)
    np.testing.assert_array_equal(out, jax.jit(apply)(params, x, 0.0))
    assert jax.eval_shape(model, x).shape == (7, 10)


# --------------------------------------------------------------------------------------
# Losses


def test_losses_and_accuracy_known_values():
    logits = jnp.array([[1.0, 0.0], [0.0, 0.0], [2.0, -1.0]], F64)
    labels = jnp.array([0, 1, 1])
    # Per example, sum over classes of (logit - onehot)^2: 0, 1, 4 + 4; mean 3.
    mse, ce, acc = jax.jit(
        lambda lo, la: (models.onehot_mse(lo, la), models.cross_entropy(lo, la),
                        models.accuracy(lo, la)))(logits, labels)
    np.testing.assert_allclose(mse, 3.0, rtol=1e-15)
    expected_ce = (math.log(1 + math.exp(-1)) + math.log(2) + math.log(math.exp(3) + 1)) / 3
    np.testing.assert_allclose(ce, expected_ce, rtol=1e-14)
    # argmax [0, 0] is class 0, so only the first example is right.
    np.testing.assert_allclose(acc, 1 / 3, rtol=1e-15)


def test_loss_by_name():
    assert models.loss_by_name("mse") is models.onehot_mse  # config loss=mse: classification
    assert models.loss_by_name("ce") is models.cross_entropy
    assert set(models.LOSSES) == {"mse", "ce"}
    with pytest.raises(ValueError, match="'mse', 'ce'"):
        models.loss_by_name("hinge")


def test_plain_mse_is_regression_mse_and_refuses_labels():
    pred = jnp.array([[1.0], [2.0], [4.0]], F64)
    target = jnp.array([[1.0], [1.0], [1.0]], F64)
    np.testing.assert_allclose(models.mse(pred, target), (0 + 1 + 9) / 3, rtol=1e-15)
    with pytest.raises(ValueError, match="onehot_mse"):
        models.mse(jnp.zeros((3, 2), F64), jnp.array([0, 1, 1]))


# --------------------------------------------------------------------------------------
# Training-time noise and BatchNorm


def test_gaussian_dropout_moments_and_smoothness_in_rate():
    x = jnp.ones((200_000,), F64)
    y = models.gaussian_dropout(jax.random.key(0), x, 0.3)
    # Inverted Bernoulli dropout's mean 1 and variance p / (1 - p).
    np.testing.assert_allclose(float(jnp.mean(y)), 1.0, atol=5e-3)
    np.testing.assert_allclose(float(jnp.var(y)), 0.3 / 0.7, rtol=2e-2)
    f = lambda r: jnp.sum(models.gaussian_dropout(jax.random.key(1), x[:10], r) ** 2)  # noqa: E731
    h = 1e-6
    fd = (f(0.3 + h) - f(0.3 - h)) / (2 * h)
    np.testing.assert_allclose(jax.grad(f)(0.3), fd, rtol=1e-7)


def test_translate_moves_by_whole_pixels_and_interpolates_between():
    img = jnp.zeros((1, 5, 5, 1), F64).at[0, 2, 2, 0].set(1.0)
    out = models.translate(img, jnp.array([[1.0, -2.0]], F64), (5, 5, 1))
    assert float(out[0, 3, 0, 0]) == 1.0 and float(jnp.sum(out)) == 1.0
    half = models.translate(img, jnp.array([[0.5, 0.0]], F64), (5, 5, 1))
    np.testing.assert_allclose(half[0, 2:4, 2, 0], [0.5, 0.5], rtol=1e-15)
    # Shifted off the edge, the image is gone (zero padding); flat inputs keep their shape.
    assert float(jnp.sum(models.translate(img, jnp.array([[9.0, 0.0]], F64), (5, 5, 1)))) == 0
    flat = models.random_translate(jax.random.key(0), img.reshape(1, 25), 0.7, (5, 5, 1))
    assert flat.shape == (1, 25)


def test_dropout_needs_a_key_and_changes_the_output():
    apply, params = models.functional(
        models.SeedCNN(nnx.Rngs(0), channels=(4, 4), param_dtype=F64))
    x = _normal(1, (3, 8, 8, 1))
    plain = apply(params, x, 0.1)
    np.testing.assert_array_equal(plain, apply(params, x, 0.1, dropout=0.2))  # no key: eval
    noisy = apply(params, x, 0.1, dropout=0.2, key=jax.random.key(0))
    assert not np.allclose(plain, noisy)
    np.testing.assert_array_equal(noisy, apply(params, x, 0.1, dropout=0.2,
                                               key=jax.random.key(0)))


def test_batchnorm_cnn_state_evolves_in_training_only():
    model = models.BatchNormCNN(nnx.Rngs(0), channels=(4, 4), param_dtype=F64)
    apply, params, state = models.stateful(model)
    assert set(state["norms"][0]) == {"mean", "var"}
    assert state["norms"][0]["mean"].dtype == F64
    x = _normal(1, (6, 8, 8, 1))
    out, new = apply(params, state, x, 0.1, train=True)
    assert out.shape == (6, 10)
    assert not np.allclose(new["norms"][0]["mean"], state["norms"][0]["mean"])
    _, same = apply(params, state, x, 0.1)
    np.testing.assert_array_equal(same["norms"][1]["var"], state["norms"][1]["var"])
