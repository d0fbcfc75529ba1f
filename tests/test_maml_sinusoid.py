"""The maml-sinusoid experiment: its scoring against the library's objective, and the real
command end to end on a tiny config."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import hypergrad as hg
from hypergrad.cli import main
from hypergrad_experiments import maml_sinusoid as ms

# One method, one K, a tenth of the default's meta-steps at a larger meta step: about
# 20 s, most of it compiling MAML's meta-step.
TINY = ["--set", "shots=10", "--set", "methods=maml", "--set", "meta_steps=400",
        "--set", "outer_lr=0.01", "--set", "test_tasks=200", "--set", "test_queries=20",
        "--set", "test_steps=3"]


@pytest.mark.parametrize("method", ["maml", "meta_sgd", "imaml", "pretrained"])
def test_the_test_curve_is_the_library_objective_on_the_same_tasks(method):
    """The held-out curve's point at the training horizon equals ``hg.unroll.objective``
    of the method's task on the same tasks: the same adaptation rule (Meta-SGD's steps in
    ravel order, iMAML's proximal term) and the same query loss."""
    config = ms.MamlSinusoidConfig(dtype="float64", hidden="6,5", steps=2, imaml_steps=2)
    task = ms.method_task(config, method, 4)
    phi = task.space.init()
    key = jax.random.key(3)
    # A start away from the default, each learned step its own value.
    noise = jax.random.split(key)
    phi = dict(phi, init=phi["init"] + 0.3 * jax.random.normal(noise[0], phi["init"].shape))
    if method == "meta_sgd":
        phi["learning_rate"] = jax.tree.map(
            lambda a: a + 0.5 * jax.random.normal(noise[1], a.shape), phi["learning_rate"])
    tasks = hg.tasks.Tasks(ms.sampler(4, 7, jnp.float64), 6)
    support, query = tasks.draws(jax.random.split(key)[0])  # what objective draws from key
    expected = hg.unroll.objective(task.replace(tasks=tasks), phi, key)[0]
    unravel = ravel_pytree(ms.init_mlp(jax.random.key(0), (6, 5), jnp.float64))[1]
    init, lr, lam = ms.adaptation_rule(config, task, phi)
    losses, _ = ms.curve_fn(unravel, 2)(init, lr, lam, support, query)
    horizon = 0 if method == "pretrained" else task.steps  # pretrained: an inner step of 0
    np.testing.assert_allclose(losses[horizon], expected, rtol=1e-10)
    if method == "meta_sgd":
        assert np.ptp(np.asarray(lr)) > 0.5 * float(np.mean(lr))  # one step per weight


def test_maml_sinusoid_tiny_end_to_end(tmp_path, capsys):
    workdir = tmp_path / "m"
    assert main(["run", "maml-sinusoid", *TINY, "--workdir", str(workdir), "--quiet"]) == 0
    results = json.loads((workdir / "results.json").read_text())
    assert set(results["shots"]) == {"10"}
    r = results["shots"]["10"]["maml"]
    assert r["meta_steps"] == 400 and r["final_meta_step"] == 400
    for name in ("start_mse", "best_mse", "final_mse"):
        assert len(r[name]) == 4 and np.all(np.isfinite(r[name]))
    # The untrained start predicts ~0: its error is about E[A^2] / 2 = 4.2 whatever the
    # steps (a step of 0.01 barely moves it); after 400 meta-steps MAML's start, adapted
    # by one step, is far below it on the held-out tasks (2.5 against 4.5 measured).
    assert 3.5 < r["start_mse"][1] < 5.5
    assert abs(r["start_mse"][1] - r["start_mse"][0]) < 0.05
    assert r["final_mse"][1] < 0.75 * r["start_mse"][1]
    assert r["final_mse"][1] < 0.9 * r["final_mse"][0]  # and adaptation is what helps
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["k10_maml_mse_1_step"] == r["final_mse"][1]
    assert (workdir / "mse_vs_steps.png").stat().st_size > 0
    # `hypergrad plot` redraws the figure from results.json alone.
    assert main(["plot", str(workdir), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "mse_vs_steps.png").stat().st_size > 0


@pytest.mark.parametrize("setting,message", [
    ("methods=maml,reptile", "methods must be some of"),
    ("shots=5,0", "shots must be positive integers"),
    ("batch_size=5", "batch_size must be 0"),
    ("imaml_lam=0", "imaml_lam must be > 0"),
])
def test_bad_values_are_config_errors(setting, message, tmp_path, capsys):
    assert main(["run", "maml-sinusoid", "--set", setting, "--workdir",
                 str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err


def test_the_documented_command_parses():
    from hypergrad import cli

    args = cli._parser().parse_args(["run", "maml-sinusoid", *TINY])
    experiment, config = cli._resolve(args.experiment, args.sets)
    assert experiment.name == "maml-sinusoid"
    assert config.method_list() == ["maml"]
    assert config.meta_steps == 400 and config.shot_list() == [10]
