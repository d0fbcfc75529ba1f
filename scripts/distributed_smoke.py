"""Run the sharded population path under ``jax.distributed`` with one process, for CI.

Run:  python scripts/distributed_smoke.py [--port 12355] [--devices 4] [--workdir DIR]

It forces ``--devices`` CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count``,
unless ``XLA_FLAGS`` is already set), then runs the same command a multi-host job runs,

    hypergrad run --distributed --coordinator localhost:PORT --num-processes 1 \\
        --process-id 0 --set population=4 ...

(``jax.distributed.initialize`` with a single process, population sharded over every
device), then the same tiny seed-CNN population on one device (``devices=1``), and
compares the two runs' per-member validation losses. It prints one JSON line and exits
0 when they agree to float32 tolerance, 1 otherwise. It takes about a minute on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

TINY = ["steps=4", "batch_size=20", "channels=4,4,4", "meta_steps=2", "population=4"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=12355, help="the coordinator's port")
    p.add_argument("--devices", type=int, default=4, help="CPU devices to force")
    p.add_argument("--workdir", help="where the two runs write (default: a temporary dir)")
    p.add_argument("--rtol", type=float, default=1e-5)
    args = p.parse_args(argv)
    os.environ.setdefault("XLA_FLAGS",
                          f"--xla_force_host_platform_device_count={args.devices}")

    import jax

    from hypergrad.cli import main as hypergrad

    root = Path(args.workdir or tempfile.mkdtemp(prefix="distributed_smoke_"))
    sets = [a for kv in TINY for a in ("--set", kv)]
    status = hypergrad(["run", "--quiet", "--distributed", "--coordinator",
                        f"localhost:{args.port}", "--num-processes", "1", "--process-id",
                        "0", *sets, "--workdir", str(root / "sharded")])
    if status:
        return status
    status = hypergrad(["run", "--quiet", *sets, "--set", "devices=1",
                        "--workdir", str(root / "single")])
    if status:
        return status
    sharded, single = (json.loads((root / d / "summary.json").read_text())
                       for d in ("sharded", "single"))
    worst = 0.0
    for a, b in zip(sharded["members"], single["members"], strict=True):
        for key in ("initial_val_loss", "final_val_loss", "test_loss"):
            worst = max(worst, abs(a[key] - b[key]) / max(abs(b[key]), 1e-30))
    ok = (worst <= args.rtol and sharded["devices"] == len(jax.devices()) > 1
          and single["devices"] == 1)
    print(json.dumps({"ok": ok, "process_count": jax.process_count(),
                      "devices": sharded["devices"], "population": sharded["population"],
                      "max_rel_diff": worst, "workdir": str(root)}))
    jax.distributed.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
