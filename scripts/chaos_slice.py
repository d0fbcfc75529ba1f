"""The slice of the ``chaos`` experiment alone: the validation loss along the log learning
rate where reverse hypergradients explode, and what reverse, truncated, ES and PES
hypergradients say along it (the logic lives in ``hypergrad_experiments/chaos.py``).

Run:  python scripts/chaos_slice.py [--set points=25 --set num_pairs=16 ...] [--out DIR]

Takes the ``chaos`` experiment's config keys (``hypergrad show chaos``), skips its tuning
runs, prints one row per learning rate and writes ``DIR/results.json`` (the slice only)
and ``DIR/chaos_slice.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hypergrad.config import override
from hypergrad.experiment import get_experiment


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="runs/chaos_slice")
    args = p.parse_args()
    experiment = get_experiment("chaos")
    config = override(experiment.config, args.set).validate()
    from hypergrad_experiments import chaos

    sliced = chaos.slice_(config, chaos.build(config))
    columns = ("val_loss", "reverse", "truncated", "es", "es_stderr", "pes", "pes_stderr")
    print(f"{'lr':>8} " + " ".join(f"{h.replace('_', ' '):>11}" for h in columns)
          + " es capped pes capped")
    for i, lr in enumerate(sliced["learning_rate"]):
        print(f"{lr:8.4f} " + " ".join(f"{'nan' if v is None else f'{v:.4g}':>11}"
                                        for v in (sliced[k][i] for k in columns))
              + f" {sliced['es_capped'][i]:9d} {sliced['pes_capped'][i]:10d}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"config": config.to_dict(),
                                                  "slice": sliced}, indent=1))
    chaos.plot_slice(sliced, out / "chaos_slice.png")
    print(f"wrote {out / 'chaos_slice.png'} and {out / 'results.json'}")


if __name__ == "__main__":
    main()
