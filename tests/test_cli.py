"""The `hypergrad` command on tiny configs: files, the check, and one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from hypergrad.cli import main
from tests.problems import assert_one_line_error

TINY = ["--set", "steps=4", "--set", "meta_steps=2", "--set", "batch_size=20",
        "--set", "channels=4,4,4"]
# The tests about what a run writes, not about how it searches, run one local run (the
# default strategy's search is tested in test_strategies.py, test_run.py, test_resume.py
# and by test_run_writes_everything here).
LOCAL = [*TINY, "--set", "strategy=local"]


def test_run_writes_everything(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert main(["run", *TINY, "--workdir", str(workdir), "--quiet"]) == 0
    names = {p.name for p in workdir.iterdir()}
    assert {"config.json", "metrics.jsonl", "summary.json", "val_loss.png",
            "hparams.png"} <= names
    summary = json.loads((workdir / "summary.json").read_text())
    for key in ("initial_val_loss", "final_val_loss", "initial_hparams", "final_hparams",
                "test_loss", "test_accuracy", "seconds"):
        assert key in summary
    assert set(summary["final_hparams"]) == {"learning_rate", "momentum", "weight_decay",
                                             "leaky_slope"}
    config = json.loads((workdir / "config.json").read_text())
    assert config["experiment"] == "seed-cnn" and config["steps"] == 4
    assert "test_accuracy" in capsys.readouterr().out


def test_list(capsys):
    assert main(["list"]) == 0
    assert "seed-cnn" in capsys.readouterr().out


@pytest.mark.parametrize("estimator", ["reverse", "forward", "reversible"])
def test_check_is_below_tolerance(estimator, capsys):
    assert main(["check", *TINY, "--set", f"estimator={estimator}"]) == 0
    out = capsys.readouterr().out
    assert "learning_rate" in out and "leaky_slope" in out
    assert "rel error = |estimator - central diff| / the largest |derivative| among the " \
           "directions (" in out  # the rule, stated where the verdict is
    assert out.strip().endswith("ok")


@pytest.mark.parametrize("hvp", ["forward", "reverse"])
def test_check_with_chunked_validation_and_each_hvp(hvp, capsys):
    # With hvp=forward the Hessian-vector products also run in chunks (of 3 examples).
    chunks = ["--set", "hvp_batch_size=3"] if hvp == "forward" else []
    assert main(["check", *TINY, "--set", "val_batch_size=7", "--set", f"hvp={hvp}",
                 *chunks]) == 0
    assert capsys.readouterr().out.strip().endswith("ok")


def test_check_shows_the_bias_of_a_short_truncation(capsys):
    assert main(["check", *TINY, "--set", "estimator=truncated", "--set", "window=1"]) == 1
    assert capsys.readouterr().out.strip().endswith("FAILED")


def test_online_run_tunes_while_training(tmp_path, capsys):
    runs = {}
    # hvp=forward also with its products in chunks of 7 (of batches of 20: a remainder).
    for name, sets in (("reverse", ["hvp=reverse"]), ("forward", ["hvp=forward"]),
                       ("chunked", ["hvp=forward", "hvp_batch_size=7"])):
        workdir = tmp_path / f"online-{name}"
        assert main(["run", *TINY, "--set", "online=true", "--set", "steps=8", "--set",
                     "window=2", *[a for x in sets for a in ("--set", x)],
                     "--workdir", str(workdir), "--quiet"]) == 0
        lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
        assert [r["inner_step"] for r in lines] == [2, 4, 6, 8]
        assert lines[0]["hparams"] != lines[-1]["hparams"]
        runs[name] = lines
    # The same run every way, up to float32 rounding.
    for other in ("forward", "chunked"):
        for a, b in zip(runs["reverse"], runs[other], strict=True):
            for name, value in a["hparams"].items():
                assert abs(b["hparams"][name] - value) <= 1e-4 * abs(value), (other, name)


def test_granular_hyperparameters_and_every_kind_from_the_command_line(tmp_path):
    workdir = tmp_path / "granular"
    sets = ["hparams.learning_rate.per=layer", "hparams.learning_rate.schedule=per_step",
            "hparams.weight_decay.per=parameter", "hparams.leaky_slope.per=layer",
            "optimizer=adam", "loss_mix=0.5", "label_smoothing=0.05", "init_scale=1",
            "save_every=1"]
    argv = ["run", *LOCAL, *[a for kv in sets for a in ("--set", kv)]]
    assert main([*argv, "--workdir", str(workdir), "--quiet"]) == 0
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    hparams = lines[-1]["hparams"]
    assert set(hparams) == {"learning_rate", "b1", "b2", "eps", "weight_decay",
                            "leaky_slope", "loss_mix", "label_smoothing", "init_scale"}
    assert set(hparams["learning_rate"]["groups"]) == {"convs/0", "convs/1", "convs/2", "head"}
    assert set(hparams["leaky_slope"]["groups"]) == {"convs/0", "convs/1", "convs/2"}
    saved = sorted(p.name for p in (workdir / "hparams").iterdir())
    assert saved == ["meta_step_00000.npz", "meta_step_00001.npz", "meta_step_00002.npz"]
    with np.load(workdir / "hparams" / saved[-1]) as f:
        assert f["learning_rate"].shape == (4, 4)  # T steps x 4 layers
        assert f["learning_rate@steps"].shape == (4, 4)
        assert f["weight_decay/head/kernel"].shape == (4 * 64, 10)
    assert (workdir / "schedules.png").exists()
    config = json.loads((workdir / "config.json").read_text())
    assert config["hparams.learning_rate.schedule"] == "per_step"
    # The options are part of the run's config: resuming keeps them.
    assert main(["run", "--resume", "--workdir", str(workdir), "--set", "meta_steps=3",
                 "--quiet"]) == 0


BAD_SETS = [
    (["hparams.learning_rate.per=neuron"], "hparams.learning_rate: per must be one of"),
    (["hparams.dropout.per=layer"], "hparams.dropout: this experiment tunes no 'dropout'"),
    (["hparams.learning_rate.scheme=linear"], "expected hparams.NAME.per or hparams.NAME"),
    (["hparams.learning_rate.schedule=cosine"], "schedule must be one of constant, per_step"),
    (["optimizer=rmsprop"], "optimizer must be one of sgd, adam"),
    (["loss_mix=1.5"], "loss_mix must be strictly between 0 and 1, got 1.5"),
    (["learnin_rate=0.1"], "did you mean learning_rate"),
    (["stepz=3"], "unknown config key 'stepz'; did you mean steps"),
    (["=3"], "--set expects key=value"),
    (["steps"], "--set expects key=value"),
    (["steps=abc"], "steps must be an integer, got 'abc'"),
    (["steps=1.5"], "steps must be an integer, got '1.5'"),
    (["steps=0"], "steps must be at least 1, got 0"),
    (["meta_steps=-1"], "meta_steps must be at least 1, got -1"),
    (["batch_size=many"], "batch_size must be an integer"),
    (["batch_size=5000"], "batch_size must be an integer in [1, 1000]"),
    (["val_batch_size=-1"], "val_batch_size must be at least 0, got -1"),
    (["hvp=both"], "hvp must be one of reverse, forward"),
    (["hvp_batch_size=4"], "hvp_batch_size chunks hvp=forward's Hessian-vector products; "
                           "set hvp=forward or hvp_batch_size=0 (hvp is reverse)"),
    (["hvp=forward", "hvp_batch_size=-1"], "hvp_batch_size must be at least 0, got -1"),
    (["seed=-1"], "seed must be at least 0"),
    (["save_every=0"], "save_every must be at least 1"),
    (["checkpoint=-2"], "checkpoint must be auto, none, step, nested or a positive integer"),
    (["outer=sgd"], "outer must be one of gd, ncg, adam"),
    (["outer_lr=0"], "outer_lr must be > 0"),
    (["outer_lr=fast"], "outer_lr must be a number, got 'fast'"),
    (["clip=-1"], "clip must be >= 0"),
    (["loss=hinge"], "loss must be one of mse, ce"),
    (["dtype=float16"], "dtype must be one of float32, float64"),
    (["data=mnistt"], "data: unknown dataset 'mnistt'; available: digits, mnist"),
    (["learning_rate=-0.1"], "learning_rate must be > 0, got -0.1"),
    (["learning_rate=nan"], "learning_rate must be > 0, got nan"),
    (["momentum=1.5"], "momentum must be strictly between 0 and 1"),
    (["momentum=0"], "momentum must be strictly between 0 and 1, got 0"),
    (["weight_decay=0"], "weight_decay must be > 0, got 0"),
    (["leaky_slope=1"], "leaky_slope must be strictly between 0 and 1"),
    (["channels=8,x"], "channels must be positive integers separated by commas"),
    (["channels=0"], "channels must be positive integers"),
    (["estimator=magic"], "estimator must be one of reverse, truncated, forward, implicit, "
                          "reversible"),
    (["estimator=implicit"], "implicit estimator cannot differentiate learning_rate"),
    (["estimator=implicit", "solver=neumann"], "solver neumann needs solver_step"),
    (["estimator=truncated", "window=500"], "window must be at most steps (100)"),
    (["online=maybe"], "online must be true or false"),
    (["conv=fft"], "conv must be one of auto, matmul, native"),
    (["estimator=es", "sigma=0"], "sigma must be > 0"),
    (["estimator=es", "num_pairs=0"], "num_pairs must be at least 1"),
    # Issue 21: each of these was a traceback or was accepted.
    (["checkpoint=²"], "checkpoint must be auto, none, step, nested or a positive integer k, "
                       "got '²'"),
    (["seed=99999999999999999999"], "seed must be at most 4294967295 (2^32 - 1, what "
                                    "jax.random.key takes), got 99999999999999999999"),
    (["seed=4294967296"], "seed must be at most 4294967295"),
    (["steps=99999999999999999999"], "steps must be at most 2147483647, got 9999"),
    (["data.val_size=2147483648"], "data.val_size must be at most 2147483647"),
    (["population=3", "population_seeds=true", "seed=4294967294"],
     "seed + population - 1 must be at most 4294967295"),
    (["population=2", "population_spread=inf"], "population_spread must be a finite "
                                                "number, got inf"),
    (["population_spread=nan"], "population_spread must be >= 0, got nan"),
    (["outer_lr=inf"], "outer_lr must be a finite number, got inf"),
    (["clip=inf"], "clip must be a finite number, got inf"),
    (["tol=1e999"], "tol must be a finite number, got inf"),
    (["solver_step=inf"], "solver_step must be a finite number, got inf"),
    (["data.train_size=5000"], "train_size + val_size = 5400 exceeds the 1797 examples "
                               "available; lower train_size or val_size"),
]


@pytest.mark.parametrize("sets, message", BAD_SETS, ids=[s[0][0] for s in BAD_SETS])
def test_bad_config_is_one_line_and_status_2(sets, message, capsys, tmp_path):
    argv = ["run", *[a for kv in sets for a in ("--set", kv)], "--workdir", str(tmp_path / "w")]
    assert_one_line_error(argv, message, capsys)
    assert not (tmp_path / "w").exists()  # nothing is written before the config is valid


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("runs") / "done"
    assert main(["run", *LOCAL, "--workdir", str(workdir), "--quiet"]) == 0
    return workdir


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    "make_argv, message",
    [
        (lambda w, t: ["run", "no-such-thing"], "unknown experiment 'no-such-thing'"),
        (lambda w, t: ["run", "seed-cn"], "did you mean seed-cnn"),
        (lambda w, t: ["check", "nope"], "unknown experiment 'nope'"),
        (lambda w, t: ["frobnicate"], "invalid choice"),
        (lambda w, t: ["run", "--workdir", str(w)], "already holds files; pass --resume"),
        (lambda w, t: ["run", "--workdir", str(w / "summary.json")], "is not a directory"),
        (lambda w, t: ["run", "--workdir", str(w / "summary.json" / "x")],
         "cannot create workdir"),
        (lambda w, t: ["run", "--resume"], "--resume needs the --workdir"),
        (lambda w, t: ["run", "--resume", "--workdir", str(t / "missing")],
         "no run to resume in"),
        (lambda w, t: ["run", "--resume", "--workdir", str(w), "--set", "steps=5"],
         "cannot resume with a changed config (steps 4 -> 5); only meta_steps, budget may "
         "change"),
        (lambda w, t: ["run", "--resume", "--workdir", str(w), "--set", "outer=gd"],
         "cannot resume with a changed config (outer 'adam' -> 'gd')"),
        (lambda w, t: ["run", "other", "--resume", "--workdir", str(w)],
         "holds a run of 'seed-cnn', not 'other'"),
        (lambda w, t: ["run", "--resume", "--workdir", str(w), "--set", "meta_steps=x"],
         "meta_steps must be an integer"),
    ],
)
def test_bad_commands_are_one_line_status_2_and_keep_files(make_argv, message, capsys,
                                                           tmp_path, finished_run):
    before = snapshot(finished_run)
    assert_one_line_error(make_argv(finished_run, tmp_path), message, capsys)
    assert snapshot(finished_run) == before


@pytest.mark.parametrize(
    "damage, message",
    [
        ({"checkpoint.npz": b"garbage"}, "checkpoint"),
        ({"config.json": b"{not json"}, "config.json is unreadable"),
        ({"config.json": b'{"experiment": "seed-cnn", "steps": "four"}'},
         "steps must be an integer, got 'four'"),
        ({"config.json": b'{"experiment": "seed-cnn", "colour": 1}'}, "unknown config key"),
    ],
)
def test_damaged_runs_cannot_resume_and_are_kept(damage, message, capsys, tmp_path,
                                                 finished_run):
    import shutil

    work = tmp_path / "copy"
    shutil.copytree(finished_run, work)
    for name, content in damage.items():
        (work / name).write_bytes(content)
    before = snapshot(work)
    assert_one_line_error(["run", "--resume", "--workdir", str(work)], message, capsys)
    assert snapshot(work) == before


def test_console_script_error_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hypergrad.cli", "run", "--set", "steps=-3"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "hypergrad: error: steps must be at least 1, got -3"
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_plot_redraws_one_run_and_overlays_several(tmp_path, capsys):
    runs = []
    for outer in ("gd", "adam"):
        workdir = tmp_path / outer
        assert main(["run", *LOCAL, "--set", f"outer={outer}", "--workdir", str(workdir),
                     "--quiet"]) == 0
        runs.append(str(workdir))
    capsys.readouterr()
    out = tmp_path / "figs"
    assert main(["plot", runs[0], "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"val_loss.png", "hparams.png"}
    assert main(["plot", *runs, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "compare_val_loss.png" in printed and "compare_hparams.png" in printed
    for name in ("compare_val_loss.png", "compare_hparams.png"):
        assert (out / name).stat().st_size > 0
    from hypergrad.plots import _labels, read_run

    configs = [read_run(r)[1] for r in runs]
    assert _labels([tmp_path / "gd", tmp_path / "adam"], configs) == ["gd", "adam"]


def test_plot_labels_fall_back_to_directory_names(tmp_path):
    from hypergrad.plots import _labels

    dirs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    assert _labels(dirs, [{"outer": "gd"}, {"outer": "gd"}, {}]) == ["gd (a)", "gd (b)", "c"]


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "no workdir"),
    (lambda d: d.mkdir() or (d / "config.json").write_text("{}"), "holds no metrics.jsonl"),
    (lambda d: d.mkdir() or (d / "metrics.jsonl").write_text(""), "no accepted meta-step"),
])
def test_plot_bad_workdir_is_one_line_exit_2(tmp_path, capsys, make, message):
    workdir = tmp_path / "w"
    make(workdir)
    assert main(["plot", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


LONG = "x" * 100_000  # issue 21, item 8: a 100 KB value must not make a 100 KB line


@pytest.mark.parametrize("argv, message", [
    (["run", "--set", f"data={LONG}"], "unknown dataset 'xxxx"),
    (["run", "--set", f"data=npz:/{LONG}"], "npz:/xxx"),
    (["run", "--set", f"steps={LONG}"], "steps must be an integer, got 'xxx"),
    (["run", "--set", f"outer={LONG}"], "outer must be one of gd, ncg, adam; got 'xxx"),
    (["run", "--set", f"checkpoint={LONG}"], "checkpoint must be auto, none, step"),
    (["run", "--set", f"online={LONG}"], "online must be true or false"),
    (["run", "--set", f"{LONG}=1"], "unknown config key 'xxx"),
    (["run", "--set", LONG], "--set expects key=value"),
    (["run", "--set", f"hparams.learning_rate.per={LONG}"], "per must be one of"),
    (["run", "--set", f"hparams.learning_rate.schedule={LONG}"], "schedule must be one of"),
    (["run", LONG], "no experiment is named 'xxx"),
    (["check", "--directions", LONG], "--directions: must be an integer"),
    (["check", "--tol", LONG], "--tol: must be a number"),
    (["plot", "w", f"--{LONG}"], "unrecognized arguments: --xxx"),
])
def test_long_values_are_cut_in_the_error_line(argv, message, capsys, tmp_path):
    workdir = ["--workdir", str(tmp_path / "w")] if argv[0] == "run" else []
    err = assert_one_line_error([*argv, *workdir], message, capsys)
    assert len(err) < 400 and "…" in err, err[:1000]
    assert not (tmp_path / "w").exists()


def test_cut_values_say_how_long_they_were():
    from hypergrad.messages import LIMIT, cut_line, show

    assert show("abc") == "'abc'"
    cut = show(LONG)
    assert len(cut) < LIMIT + 30 and cut.endswith("… (100002 characters)")
    line = cut_line("start " + LONG + " end")
    assert len(line) <= 300 and line.startswith("start x") and line.endswith("x end")


@pytest.mark.parametrize("option, message", [
    (["--directions", "0"], "argument --directions: must be at least 1, got 0"),
    (["--directions", "-1"], "argument --directions: must be at least 1, got -1"),
    (["--tol", "nan"], "argument --tol: must be a positive finite number, got nan"),
    (["--tol", "-1"], "argument --tol: must be a positive finite number, got -1"),
    (["--tol", "inf"], "argument --tol: must be a positive finite number, got inf"),
    # It used to run in float64 anyway, silently.
    (["--set", "dtype=float32"], "hypergrad check runs in float64 (central differences "
                                 "need it), so --set dtype=float32 would be ignored; drop it"),
])
def test_check_refuses_bad_options_before_any_work(option, message, capsys, monkeypatch):
    import hypergrad.run

    def no_work(*args, **kwargs):
        raise AssertionError("the check ran")

    monkeypatch.setattr(hypergrad.run, "check", no_work)
    monkeypatch.setattr(hypergrad.run, "build", no_work)
    assert_one_line_error(["check", *TINY, *option], message, capsys)


def test_plot_out_must_be_a_folder(tmp_path, capsys, finished_run):
    target = tmp_path / "figure.png"
    target.write_bytes(b"keep me")
    assert_one_line_error(["plot", str(finished_run), "--out", str(target)],
                          "is a file, not a folder; name a folder for the figures", capsys)
    assert_one_line_error(["plot", str(finished_run), "--out", str(target / "sub")],
                          "cannot create the folder", capsys)
    assert target.read_bytes() == b"keep me"


@pytest.mark.parametrize("results, message", [
    (b"{not json", "results.json is unreadable (JSONDecodeError"),
    (b"\xff\xfe", "results.json is unreadable (UnicodeDecodeError"),
    (b'{"alphas": [1]}', "results.json lacks what baydin-hd's figures need (KeyError"),
    (b"[1, 2]", "results.json lacks what baydin-hd's figures need (TypeError"),
])
def test_plot_of_an_own_main_experiment_with_garbage_results(results, message, tmp_path,
                                                             capsys):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"experiment": "baydin-hd"}')
    (workdir / "results.json").write_bytes(results)
    assert_one_line_error(["plot", str(workdir)], message, capsys)
    assert {p.name for p in workdir.iterdir()} == {"config.json", "results.json"}


def test_deterministic_after_jax_started_is_one_line(tmp_path, capsys, monkeypatch):
    import jax.numpy as jnp

    jnp.ones(1).block_until_ready()  # JAX's devices are up in this process
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert main(["run", "--set", "deterministic=true", "--set", "steps=2",
                 "--workdir", str(tmp_path / "w"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "XLA_FLAGS=--xla_gpu_deterministic_ops=true" in err[0]
    assert not (tmp_path / "w").exists()


def test_explore_picks_the_start_and_says_so(tmp_path, capsys):
    workdir = tmp_path / "e"
    assert main(["run", "--quiet", "--workdir", str(workdir), *TINY,
                 "--set", "explore=4"]) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["explored"]["evaluations"] == 4
    # The run starts from the best of the four draws and the configured values.
    assert summary["initial_val_loss"] <= summary["explored"]["best_val_loss"] + 1e-6
    assert main(["run", "--set", "explore=2", "--set", "population=2",
                 "--workdir", str(tmp_path / "p")]) == 2
    assert "explore picks one start" in capsys.readouterr().err
