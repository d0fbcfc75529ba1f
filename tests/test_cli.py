"""The `hypergrad` command on tiny configs: files, the check, and one-line errors."""

import json
import subprocess
import sys

import pytest

from hypergrad.cli import main

TINY = ["--set", "steps=4", "--set", "meta_steps=2", "--set", "batch_size=20",
        "--set", "channels=4,4,4"]


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


def test_check_is_below_tolerance(capsys):
    assert main(["check", *TINY]) == 0
    out = capsys.readouterr().out
    assert "learning_rate" in out and "leaky_slope" in out
    assert out.strip().endswith("ok")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "no-such-thing"], "unknown experiment 'no-such-thing'"),
        (["run", "seed-cn"], "did you mean seed-cnn"),
        (["run", "--set", "learnin_rate=0.1"], "did you mean learning_rate"),
        (["run", "--set", "steps=abc"], "steps must be an integer, got 'abc'"),
        (["run", "--set", "learning_rate=-0.1"], "learning_rate must be > 0, got -0.1"),
        (["run", "--set", "steps=0"], "steps must be at least 1, got 0"),
        (["run", "--set", "momentum=1.5"], "momentum must be strictly between 0 and 1"),
        (["run", "--set", "outer=sgd"], "outer must be one of gd, ncg, adam"),
        (["run", "--set", "data=mnist"], "data must be one of digits"),
        (["run", "--set", "steps"], "--set expects key=value"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_status_2(argv, message, capsys, tmp_path):
    workdir = ["--workdir", str(tmp_path / "w")] if argv[0] == "run" else []
    try:
        status = main([*argv, *workdir])
    except SystemExit as e:  # argparse's own errors
        status = e.code
    err = capsys.readouterr().err
    assert status == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("hypergrad: error:")
    assert not (tmp_path / "w").exists()  # nothing is written before the config is valid


def test_console_script_error_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hypergrad.cli", "run", "--set", "steps=-3"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "hypergrad: error: steps must be at least 1, got -3"
    assert "Traceback" not in result.stderr and result.stdout == ""
