"""scripts/hvp_cost.py: a smoke run, and the arithmetic it reports."""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "hvp_cost.py"


def test_hvp_cost_reports_the_floor():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--batch-size", "10", "--steps", "2", "--repeats", "1"],
        capture_output=True, text=True, timeout=300, check=True).stdout
    ratios = {name: float(x) for name, x in re.findall(
        r"^\s*(gradient|hvp|hvp, tangent only)\s+[\d.]+\s+([\d.]+)", out, re.M)}
    assert ratios["gradient"] == 1.0
    # The tangents of a matrix product's forward and backward pass are six products
    # against the gradient's three; recomputing the primal adds more.
    assert 1.5 < ratios["hvp, tangent only"] < ratios["hvp"], out
    assert "the two products agree" in out
    floor = re.search(r"in FLOPs: ([\d.]+) storing .* ([\d.]+) recomputing", out)
    assert floor and 2.5 < float(floor[1]) < float(floor[2]), out
