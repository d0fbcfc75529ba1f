"""Dataset distillation (hypergrad_experiments/distill.py) on tiny digit problems."""

import io
import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

import hypergrad as hg
from hypergrad.config import ConfigError, override
from hypergrad.run import run
from hypergrad_experiments import distill

TINY = ["steps=5", "meta_steps=8", "draws=2", "grid_points=3", "hidden=8",
        "data.train_size=200", "data.val_size=100", "outer_lr=0.05"]


def test_distill_tiny_runs_end_to_end(tmp_path):
    config = override(distill.EXPERIMENT.config, TINY)
    workdir = tmp_path / "d"
    summary = run(distill.EXPERIMENT, config, workdir, progress=False, out=io.StringIO())
    results = json.loads((workdir / "results.json").read_text())
    for key in ("initial", "distilled", "final", "baseline", "val_loss", "images",
                "initial_images", "labels"):
        assert key in results
    assert len(results["val_loss"]) == 8
    assert all(math.isfinite(v) for v in results["val_loss"])
    # One 8x8x1 image per digit class, labelled 0..9 in order.
    assert np.shape(results["images"]) == (10, 8, 8, 1)
    assert results["labels"] == list(range(10))
    for name in ("initial", "distilled", "final"):
        for k in ("val_loss", "test_loss", "test_accuracy", "learning_rate"):
            assert math.isfinite(results[name][k]), (name, k)
        assert 0 <= results[name]["test_accuracy"] <= 1
    base = results["baseline"]
    assert len(base["draws"]["test_accuracy"]) == 2 and len(base["val_loss"][0]) == 3
    assert all(0 <= a <= 1 for a in base["draws"]["test_accuracy"])
    assert math.isfinite(base["test_accuracy_mean"]) and base["test_accuracy_std"] >= 0
    # Tuning lowered the validation loss (deterministic: seed 0, full batch, one key).
    assert results["distilled"]["val_loss"] < results["initial"]["val_loss"]
    assert results["final"]["val_loss"] < results["initial"]["val_loss"]
    assert summary["distilled_test_accuracy"] == results["distilled"]["test_accuracy"]
    for name in ("images.png", "val_loss.png"):
        assert (workdir / name).stat().st_size > 0
    # The figures are redrawn from results.json alone.
    out = tmp_path / "redrawn"
    out.mkdir()
    assert [p.name for p in distill.redraw(workdir, out)] == ["images.png", "val_loss.png"]
    assert (out / "images.png").stat().st_size > 0


def _two_class_task(steps=4):
    """Two digit classes, one synthetic image each, a tiny MLP, float64."""
    data = hg.data.load("digits", train_size=200, val_size=100, dtype=np.float64)
    xv, yv = data.val
    keep = np.asarray(yv) < 2
    val = (xv[keep], yv[keep])
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (2, 8, 8, 1))
    space = hg.HyperSpace({distill.IMAGES: hg.real(images), "learning_rate": hg.positive(0.3)})
    model = hg.models.MLP(nnx.Rngs(0), (64, 6, 2), param_dtype=np.float64)
    task, _ = distill.distill_task(model, distill.labels_for(2, 1), val, space, steps=steps)
    return task


def test_image_hypergradient_matches_central_differences():
    task = _two_class_task()
    phi, key = task.space.init(np.float64), jax.random.key(0)
    est = jax.jit(hg.estimators.reverse())
    _, grad, _ = est(task, phi, key)
    assert grad[distill.IMAGES].shape == (2, 8, 8, 1)
    assert np.abs(grad[distill.IMAGES]).max() > 0
    # Random directions move every pixel and the learning rate together.
    assert hg.check_hypergrad(est, task, phi, key, directions=6) < 1e-6
    # Single coordinates: two pixels, one of each image, and the log learning rate.
    f = jax.jit(lambda p: hg.unroll.objective(task, p, key)[0])
    scale = max(np.abs(grad[distill.IMAGES]).max(), abs(float(grad["learning_rate"])))
    h = 1e-5
    for name, index in ((distill.IMAGES, (0, 3, 4, 0)), (distill.IMAGES, (1, 5, 2, 0)),
                        ("learning_rate", ())):
        up, down = dict(phi), dict(phi)
        up[name] = phi[name].at[index].add(h)
        down[name] = phi[name].at[index].add(-h)
        numeric = (float(f(up)) - float(f(down))) / (2 * h)
        assert abs(float(grad[name][index]) - numeric) / scale < 1e-6, (name, index)


@pytest.mark.parametrize("assignment, key", [
    ("images_per_class=0", "images_per_class"),
    ("init=zeros", "init"),
    ("model=cnn", "model"),
    ("batch_size=5", "batch_size"),
    ("hidden=0", "hidden"),
    ("grid_low=3", "grid_low"),
    ("learning_rate=0", "learning_rate"),
    ("hparams.images.per=layer", "hparams.images"),
])
def test_bad_values_are_config_errors(assignment, key):
    with pytest.raises(ConfigError, match=key):
        override(distill.EXPERIMENT.config, [assignment])


def test_images_per_class_is_readable_when_it_exceeds_a_class():
    config = override(distill.EXPERIMENT.config, ["images_per_class=40",
                                                  "data.train_size=100"])
    with pytest.raises(ConfigError, match="images_per_class=40 exceeds"):
        distill.build(config)


def test_images_start_and_labels():
    config = override(distill.EXPERIMENT.config, ["images_per_class=2", "hidden=4",
                                                  "data.train_size=200"])
    data = config.load_data()
    start = distill.initial_images(config, data)
    assert start.shape == (20, 8, 8, 1)
    # Two means of disjoint halves of each class: distinct, and their mean is the class's.
    x, y = np.asarray(data.train[0], np.float64), np.asarray(data.train[1])
    for c in range(10):
        a, b = start[2 * c], start[2 * c + 1]
        assert not np.allclose(a, b)
        n = np.sum(y == c)
        na = (n + 1) // 2
        np.testing.assert_allclose((na * a + (n - na) * b) / n, x[y == c].mean(0), atol=1e-12)
    assert distill.labels_for(3, 2).tolist() == [0, 0, 1, 1, 2, 2]
    real = distill.real_draw(data, 2, np.random.default_rng(0))
    assert real.shape == (20, 8, 8, 1)
    noise = distill.initial_images(override(config, ["init=noise"]), data)
    assert noise.shape == (20, 8, 8, 1) and 0 <= noise.min() and noise.max() <= 1


def test_mnist_variant_is_registered_with_mnist_defaults():
    config = distill.MNIST.config
    assert distill.MNIST.name == "distill-mnist" and config.data == "mnist"
    assert isinstance(config, distill.DistillConfig) and config.hidden == "128"
    override(config, ["data=idx:../shared/data/mnist-10k"])  # validates without loading
