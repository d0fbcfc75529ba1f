"""Smoke tests of the built-in experiments on tiny configs, through the real command."""

import json

from hypergrad.cli import main


def test_list_names_every_experiment(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "seed-cnn" in out and "grazzi-hierarchy" in out


def test_grazzi_hierarchy_tiny(tmp_path, capsys):
    workdir = tmp_path / "g"
    assert main(["run", "grazzi-hierarchy", "--set", "steps=300", "--set", "iterations=1,8",
                 "--set", "repeats=1", "--workdir", str(workdir), "--quiet"]) == 0
    results = json.loads((workdir / "results.json").read_text())
    assert set(results) == {"reverse", "cg", "fixed_point", "neumann"}
    for r in results.values():
        assert r["t"] == [1, 8] and len(r["rel_error"]) == 2
    # Conjugate gradient is the most accurate at equal iterations; K Neumann terms equal
    # K fixed-point iterations from zero.
    assert results["cg"]["rel_error"][1] < results["fixed_point"]["rel_error"][1]
    assert results["cg"]["rel_error"][1] < results["reverse"]["rel_error"][1]
    assert abs(results["neumann"]["rel_error"][1] - results["fixed_point"]["rel_error"][1]) < 1e-9
    assert (workdir / "hierarchy.png").stat().st_size > 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["t_max"] == 8


def test_grazzi_hierarchy_cannot_resume(tmp_path, capsys):
    assert main(["run", "grazzi-hierarchy", "--resume", "--workdir", str(tmp_path)]) == 2
    assert "no run to resume" in capsys.readouterr().err
