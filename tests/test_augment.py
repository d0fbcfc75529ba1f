"""The augment experiment: smoke test through the real command, and its config errors."""

import json

from hypergrad.cli import main

TINY = ["--set", "meta_steps=2", "--set", "steps=5", "--set", "batch_size=10",
        "--set", "channels=2", "--set", "data.train_size=40", "--set", "data.val_size=20",
        "--set", "data.test_size=20", "--quiet"]


def test_augment_tiny_tunes_the_strengths(tmp_path):
    workdir = tmp_path / "a"
    assert main(["run", "augment", "--workdir", str(workdir), *TINY]) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary["final_hparams"]) == {"learning_rate", "augment_shift",
                                             "augment_noise", "dropout"}
    for name in ("augment_shift", "augment_noise", "dropout"):
        assert summary["final_hparams"][name] != summary["initial_hparams"][name], name
    assert summary["meta_steps_run"] == 2 and summary["rejected_meta_steps"] == 0


def test_augment_bad_values_are_config_errors(tmp_path, capsys):
    assert main(["run", "augment", "--set", "tune=shift,color",
                 "--workdir", str(tmp_path / "x")]) == 2
    assert "tune" in capsys.readouterr().err
    assert main(["run", "augment", "--set", "dropout=1.5",
                 "--workdir", str(tmp_path / "y")]) == 2
    assert "dropout" in capsys.readouterr().err
    # The extremes (issue 34): a rate of 1 or 0 or below, a negative strength.
    for value, message in [("dropout=1.0", "dropout must be strictly between 0 and 1, got 1"),
                           ("dropout=0", "dropout must be strictly between 0 and 1, got 0"),
                           ("dropout=-0.1", "dropout must be strictly between 0 and 1"),
                           ("augment_noise=-1", "augment_noise must be > 0, got -1"),
                           ("augment_shift=0", "augment_shift must be > 0, got 0")]:
        assert main(["run", "augment", "--set", value, "--workdir",
                     str(tmp_path / "z")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, value
    assert not (tmp_path / "z").exists()
