"""The MNIST experiments: registered with MNIST defaults, tiny runs on the embedded digits,
and (when ``../shared/data/mnist-10k`` is present) built on the real files."""

import json
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest

from hypergrad.cli import main
from hypergrad.config import ConfigError
from hypergrad.experiment import get_experiment

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist-10k"
MNIST_EXPERIMENTS = ("seed-mnist", "maclaurin-mnist", "hyper-cleaning-mnist", "grazzi-mnist",
                     "baydin-mnist", "distill-mnist")
needs_mnist = pytest.mark.skipif(not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                                 reason=f"no real MNIST at {MNIST_DIR}")


def test_mnist_experiments_default_to_mnist():
    for name in MNIST_EXPERIMENTS:
        config = get_experiment(name).config
        assert config.data == "mnist", name
        config.validate()
    assert get_experiment("maclaurin-mnist").config.widths() == (784, 50, 50, 50, 10)
    assert get_experiment("grazzi-mnist").config.space().init()["l2"].shape == (784,)


@pytest.mark.slow
def test_seed_mnist_tiny_on_digits(tmp_path):
    workdir = tmp_path / "s"
    assert main(["run", "seed-mnist", "--set", "data=digits", "--set", "data.train_size=200",
                 "--set", "data.val_size=100", "--set", "data.test_size=100",
                 "--set", "steps=5", "--set", "meta_steps=2", "--set", "batch_size=50",
                 "--set", "channels=2,2,2", "--set", "val_batch_size=0",
                 "--workdir", str(workdir), "--quiet"]) == 0
    results = json.loads((workdir / "results.json").read_text())
    assert list(results["methods"]) == ["gd", "ncg", "adam"]
    start = results["start"]
    assert start["hparams"]["learning_rate"] == pytest.approx(0.01)
    for m in results["methods"].values():
        assert len(m["val_loss"]) == 2 and len(m["learning_rate"]) == 2
        # Meta-step 1 evaluates the start: retraining gives its value again, and the
        # incumbent is never worse than it.
        assert m["val_loss"][0] == pytest.approx(start["val_loss"], rel=1e-5)
        assert m["best"]["val_loss"] <= start["val_loss"] * (1 + 1e-5)
        assert 0 <= m["best"]["test_accuracy"] <= 1
    assert (workdir / "methods.png").stat().st_size > 0


def test_seed_mnist_rejects_an_unknown_hyper_update(tmp_path, capsys):
    assert main(["run", "seed-mnist", "--set", "outers=gd,lbfgs",
                 "--workdir", str(tmp_path / "x")]) == 2
    assert "outers must be" in capsys.readouterr().err


def test_maclaurin_compare_reversible_beside_checkpointed_reverse():
    from hypergrad_experiments import maclaurin_schedules as ms

    config = ms.MaclaurinConfig(steps=30, batch_size=50, data_train_size=200,
                                data_val_size=100, dtype="float64", estimator="reversible",
                                compare="none,nested").validate()
    problem = ms.build(config)
    rows = ms.compare(config, problem, problem.task.space.init(np.float64), jax.random.key(0))
    assert list(rows) == ["reversible", "reverse, checkpoint=none",
                          "reverse, checkpoint=nested"]
    # Reversible learning runs on a 2**-40 fixed-point grid: the same hypergradient to
    # rounding of that grid, not of float64.
    for row in rows.values():
        assert row["max_relative_difference"] < 1e-6
        assert row["seconds"] > 0
    none, nested = rows["reverse, checkpoint=none"], rows["reverse, checkpoint=nested"]
    assert none["max_relative_difference"] == pytest.approx(
        nested["max_relative_difference"], abs=1e-12)
    assert nested["temp_bytes"] < none["temp_bytes"]
    assert rows["reversible"]["temp_bytes"] < none["temp_bytes"]
    assert rows["reversible"]["argument_bytes"] == none["argument_bytes"]


def test_maclaurin_compare_names_a_bad_policy():
    from hypergrad_experiments import maclaurin_schedules as ms

    with pytest.raises(ConfigError, match="compare"):
        ms.MaclaurinConfig(compare="none,sometimes").validate()


def test_grazzi_features_must_match_the_data(tmp_path, capsys):
    assert main(["run", "grazzi-hierarchy", "--set", "features=784",
                 "--workdir", str(tmp_path / "g")]) == 2
    assert "features must be 64" in capsys.readouterr().err


def test_reproduce_mnist_without_data_says_so(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce_mnist.sh")],
                         env={"PATH": "/usr/bin:/bin", "MNIST": str(tmp_path / "none")},
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "no MNIST directory" in out.stderr and out.stderr.count("\n") == 1


@needs_mnist
def test_mnist_experiments_build_on_real_mnist():
    import dataclasses

    from hypergrad import experiment

    small = {"data": f"idx:{MNIST_DIR}", "data_train_size": 300, "data_val_size": 100,
             "data_test_size": 100, "steps": 60}
    for name in MNIST_EXPERIMENTS:
        exp = get_experiment(name)
        config = dataclasses.replace(exp.config, **small).validate()
        task = experiment.build(exp, config).task
        x = task.val_data[0]  # distill trains on its synthetic images, not on these
        assert x.shape[0] == 100 and np.prod(x.shape[1:]) == 784, name
        assert float(x.max()) <= 1.0 and float(x.min()) >= 0.0, name
