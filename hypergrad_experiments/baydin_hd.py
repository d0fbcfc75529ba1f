"""baydin-hd: iterations to a training loss, with and without hypergradient descent.

Run:  hypergrad run baydin-hd        (about 2.3 minutes on 2 CPU cores, shared)

Mirrors Baydin et al. (2018), "Online Learning Rate Adaptation with Hypergradient
Descent", Fig. 3 (the grid of initial learning rate alpha_0 and hypergradient step beta)
on the embedded digits instead of MNIST: logistic regression and an MLP (64-100-100-10,
ReLU) trained with minibatches of 128 by SGD, SGD with Nesterov momentum (0.9) and Adam,
each with hypergradient descent (:func:`hypergrad.online.sgd_hd`, ``sgdn_hd``,
``adam_hd``) for every alpha_0 in ``alphas`` and beta in ``betas``, and without it
(beta = 0, which is exactly the plain optimizer). For each run it records the
full-training-set loss every ``eval_every`` iterations and the first iteration at which
it is at most the model's target (``target_logreg``, ``target_mlp``); a run that never
gets there in ``steps`` iterations, or diverges, is marked "not reached".

One ``jax.vmap`` over the whole grid and one compile per model and optimizer; every run
starts from the same weights and sees the same minibatches.

Writes ``results.json`` and ``iterations.png``. Measured (seed 0, 3000 iterations, targets
0.3 for logistic regression and 0.1 for the MLP): runs reaching the target, with HD out of
36 / without out of 6: logistic regression SGD 21 / 1, SGDN 32 / 2, Adam 36 / 3; MLP SGD
14 / 1, SGDN 30 / 2, Adam 21 / 3. At alpha_0 = beta = 1e-3, logistic regression: SGD not
reached (loss 1.86 after 3000), SGD-HD 1600, SGDN not reached / SGDN-HD 150, Adam 1490 /
Adam-HD 30. The paper, on MNIST logistic regression at alpha_0 = beta = 1e-3: SGD 2657
iterations, SGD-HD 153. Ours differ because the problem differs: 1000 digits with 64
features instead of 60000 MNIST images with 784, and a target loss of our choosing; the
learning rate's hypergradient ``grad_t . grad_{t-1}`` scales with the squared gradient
norm, which depends on the data, so the same beta need not move alpha as fast.

``baydin-mnist`` is the same grid on real MNIST (5000 training images, 784 inputs, 2000
iterations; ``--set data=idx:DIR`` for MNIST-format files). Measured there (seed 0), at
alpha_0 = beta = 1e-3, logistic regression to loss 0.3: SGD not reached / SGD-HD 1480,
SGDN not reached / SGDN-HD 150, Adam 650 / Adam-HD 60 (docs/gallery/baydin_hd.md, "On real MNIST").
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import hypergrad as hg
from hypergrad.config import Config, ConfigError
from hypergrad.experiment import Experiment, Problem
from hypergrad.task import classification
from hypergrad.unroll import batch_indices

MODELS = ("logreg", "mlp")
OPTIMIZERS = {"sgd": "SGD", "sgdn": "SGDN", "adam": "Adam"}


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"{name} must be positive numbers separated by commas, got {text!r}")
    return values


def _names(text: str, name: str, choices) -> list[str]:
    values = [v.strip() for v in text.split(",")]
    bad = [v for v in values if v not in choices]
    if bad or not values:
        raise ConfigError(f"{name} must be some of {', '.join(choices)} separated by commas, "
                          f"got {text!r}")
    return values


@dataclasses.dataclass(frozen=True)
class BaydinConfig(Config):
    """``steps`` is the most training iterations per run; ``alphas`` and ``betas`` span the
    grid; ``target_logreg`` and ``target_mlp`` are the training losses (cross-entropy on
    the whole training set) to reach; ``eval_every`` is how often it is measured."""

    steps: int = 3000
    batch_size: int = 128
    loss: str = "ce"
    alphas: str = "1e-1,1e-2,1e-3,1e-4,1e-5,1e-6"
    betas: str = "1e-6,1e-5,1e-4,1e-3,1e-2,1e-1"
    models: str = "logreg,mlp"
    optimizers: str = "sgd,sgdn,adam"
    target_logreg: float = 0.3
    target_mlp: float = 0.1
    eval_every: int = 10
    hidden: int = 100
    momentum: float = 0.9

    def space(self) -> hg.HyperSpace:
        """SGD's learning rate at the first alpha_0: what ``hypergrad check baydin-hd``
        differentiates (the grid itself adapts it online, not through this space)."""
        return hg.HyperSpace({"learning_rate": hg.positive(_floats(self.alphas, "alphas")[0])})

    def validate(self) -> BaydinConfig:
        super().validate()
        if self.loss != "ce":
            raise ConfigError(f"baydin-hd trains with cross-entropy; loss must be ce, got "
                              f"{self.loss}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.eval_every < 1:
            raise ConfigError(f"eval_every must be at least 1, got {self.eval_every}")
        if self.hidden < 1:
            raise ConfigError(f"hidden must be at least 1, got {self.hidden}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum:g}")
        for name in ("target_logreg", "target_mlp"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name):g}")
        self.grid()
        return self

    def grid(self) -> tuple[list[float], list[float], list[str], list[str]]:
        """``(alphas, betas, models, optimizers)`` parsed from their comma lists."""
        return (_floats(self.alphas, "alphas"), _floats(self.betas, "betas"),
                _names(self.models, "models", MODELS),
                _names(self.optimizers, "optimizers", OPTIMIZERS))


def _model(name: str, config: BaydinConfig, features: int, classes: int, dtype):
    rngs = nnx.Rngs(config.seed)
    if name == "logreg":
        return hg.models.LogisticRegression(rngs, features, classes, param_dtype=dtype)
    return hg.models.MLP(rngs, (features, config.hidden, config.hidden, classes),
                         param_dtype=dtype)


def build(config: BaydinConfig, model: str = "logreg") -> Problem:
    """The classification task of one model (ReLU, cross-entropy) on the configured data."""
    dtype = jnp.dtype(config.dtype)
    data = config.load_data()
    net = _model(model, config, math.prod(data.input_shape), data.num_classes, dtype)
    task, predict = classification(net, data, config.hyperspace(), steps=config.steps,
                                   batch_size=config.batch_size, loss="ce", slope=0.0)
    evaluate = hg.classification_scores(task, predict, data.test)

    return Problem(task, evaluate)


def _optimizer(name: str, alpha0, beta, momentum: float) -> optax.GradientTransformation:
    if name == "sgd":
        return hg.online.sgd_hd(alpha0, beta)
    if name == "sgdn":
        return hg.online.sgdn_hd(alpha0, beta, momentum)
    return hg.online.adam_hd(alpha0, beta)


def make_grid_run(task: hg.Task, optimizer: str, steps: int, eval_every: int,
                  momentum: float):
    """A jitted ``(alpha0s, betas, key) -> (losses, learning_rates)`` over a flat grid.

    ``losses[i, j]`` is run i's loss on the whole training set after ``j * eval_every``
    iterations (``j = 0`` is the initial loss); ``learning_rates[i, j]`` its learning rate
    then. Every run trains ``steps`` iterations from ``task.params`` on the same
    minibatches (drawn from ``key``).
    """
    evals = steps // eval_every

    def full_loss(params):
        return task.train_loss(params, {}, task.train_data)

    def one(alpha0, beta, idx):
        opt = _optimizer(optimizer, alpha0, beta, momentum)

        def step(carry, batch_idx):
            params, state = carry
            batch = jax.tree.map(lambda a: jnp.take(a, batch_idx, axis=0), task.train_data)
            grads = jax.grad(task.train_loss)(params, {}, batch)
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        def chunk(carry, chunk_idx):
            carry, _ = jax.lax.scan(step, carry, chunk_idx)
            return carry, (full_loss(carry[0]), carry[1].learning_rate)

        carry = (task.params, opt.init(task.params))
        _, (losses, lrs) = jax.lax.scan(chunk, carry, idx)
        lr0 = jnp.asarray(alpha0, lrs.dtype)[None]
        return (jnp.concatenate([full_loss(task.params)[None], losses]),
                jnp.concatenate([lr0, lrs]))

    def run(alpha0s, betas, key):
        idx = batch_indices(key, task.num_examples, task.batch_size, evals * eval_every)
        idx = idx.reshape(evals, eval_every, task.batch_size)
        return jax.vmap(one, in_axes=(0, 0, None))(alpha0s, betas, idx)

    return jax.jit(run)


def iterations_to(losses: np.ndarray, target: float, eval_every: int) -> list[int | None]:
    """The first iteration whose loss is at most ``target`` per run; ``None`` if none is
    (a non-finite loss never counts as reached)."""
    out = []
    for row in losses:
        hit = np.flatnonzero(np.isfinite(row) & (row <= target))
        out.append(int(hit[0]) * eval_every if hit.size else None)
    return out


def main(config: BaydinConfig, workdir: Path, progress: bool) -> dict:
    """Train every grid point of every model and optimizer; write results and figure."""
    if config.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    alphas, betas, models, optimizers = config.grid()
    dtype = jnp.dtype(config.dtype)
    # Flat grid: every (alpha0, beta) pair, then every alpha0 with beta = 0 (no HD).
    a = np.array([x for x in alphas for _ in betas] + alphas)
    b = np.array([y for _ in alphas for y in betas] + [0.0] * len(alphas))
    key = jax.random.key(config.seed)
    results = {"alphas": alphas, "betas": betas, "eval_every": config.eval_every,
               "steps": config.steps, "runs": {}}
    for model in models:
        task = build(config, model).task
        target = config.target_logreg if model == "logreg" else config.target_mlp
        for name in optimizers:
            t0 = time.perf_counter()
            run = make_grid_run(task, name, config.steps, config.eval_every, config.momentum)
            losses, lrs = jax.device_get(run(jnp.asarray(a, dtype), jnp.asarray(b, dtype),
                                             key))
            iters = iterations_to(losses, target, config.eval_every)
            n = len(alphas) * len(betas)
            grid = [iters[i * len(betas):(i + 1) * len(betas)] for i in range(len(alphas))]
            results["runs"][f"{model}/{name}"] = {
                "model": model, "optimizer": name, "target": target,
                "iterations_hd": grid,  # [alpha index][beta index]
                "iterations_plain": iters[n:],  # [alpha index]
                "final_loss_hd": _rows(losses[:n, -1], len(betas)),
                "final_loss_plain": _finite(losses[n:, -1]),
                "final_lr_hd": _rows(lrs[:n, -1], len(betas)),
                "seconds": time.perf_counter() - t0,
            }
            if progress:
                print(f"{model:6s} {name:4s} {time.perf_counter() - t0:6.1f} s", flush=True)
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(workdir / "results.json", workdir / "iterations.png")
    return summarize(results)


def _finite(x) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in np.asarray(x)]


def _rows(x, width: int) -> list[list[float | None]]:
    flat = _finite(x)
    return [flat[i:i + width] for i in range(0, len(flat), width)]


def summarize(results: dict) -> dict:
    """Per model and optimizer: runs that reached the target with and without HD, and the
    iterations at alpha_0 = beta = 1e-3 (the paper's headline setting) when on the grid."""
    out = {}
    alphas, betas = results["alphas"], results["betas"]
    for key, r in results["runs"].items():
        entry = {
            "reached_hd": sum(v is not None for row in r["iterations_hd"] for v in row),
            "reached_plain": sum(v is not None for v in r["iterations_plain"]),
            "grid_hd": len(alphas) * len(betas), "grid_plain": len(alphas),
            "seconds": r["seconds"],
        }
        if 1e-3 in alphas and 1e-3 in betas:
            i, j = alphas.index(1e-3), betas.index(1e-3)
            entry["at_1e-3_plain"] = r["iterations_plain"][i]
            entry["at_1e-3_hd"] = r["iterations_hd"][i][j]
        out[key] = entry
    return out


def plot(results_path: Path, path: Path) -> None:
    """Heatmaps of iterations to the target, one per model and optimizer, from
    ``results.json``: columns alpha_0, rows beta, the bottom row without HD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    results = json.loads(Path(results_path).read_text())
    alphas, betas, runs = results["alphas"], results["betas"], results["runs"]
    models = list(dict.fromkeys(r["model"] for r in runs.values()))
    optimizers = list(dict.fromkeys(r["optimizer"] for r in runs.values()))
    top = max(results["steps"], 1)
    norm = LogNorm(vmin=max(results["eval_every"], 1), vmax=top)
    fig, axes = plt.subplots(len(models), len(optimizers),
                             figsize=(3.7 * len(optimizers) + 1.0, 3.0 * len(models)),
                             dpi=80, squeeze=False)
    image = None
    for row, model in enumerate(models):
        for col, opt in enumerate(optimizers):
            ax = axes[row][col]
            r = runs[f"{model}/{opt}"]
            table = [[r["iterations_hd"][i][j] for i in range(len(alphas))]
                     for j in range(len(betas))]
            table.append(list(r["iterations_plain"]))
            values = np.array([[np.nan if v is None else v for v in line] for line in table],
                              dtype=float)
            cmap = plt.get_cmap("viridis").with_extremes(bad="0.85")
            image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm,
                              aspect="auto", origin="upper")
            for j, line in enumerate(table):
                for i, v in enumerate(line):
                    text = "–" if v is None else (f"{v / 1000:.1f}k" if v >= 1000 else str(v))
                    dark = v is None or norm(v) > 0.6  # light cell: dark text
                    ax.text(i, j, text, ha="center", va="center", fontsize=6,
                            color="0.2" if dark else "white")
            ax.axhline(len(betas) - 0.5, color="white", linewidth=2)
            ax.set_xticks(range(len(alphas)), [_power(x) for x in alphas], fontsize=7)
            ax.set_yticks(range(len(betas) + 1), [_power(x) for x in betas] + ["no HD"],
                          fontsize=7)
            label = "logistic regression" if model == "logreg" else "MLP"
            ax.set_title(f"{label}, {OPTIMIZERS[opt]}-HD: loss ≤ {r['target']:g}",
                         fontsize=8)
            if row == len(models) - 1:
                ax.set_xlabel(r"initial learning rate $\alpha_0$", fontsize=8)
            if col == 0:
                ax.set_ylabel(r"hypergradient step $\beta$", fontsize=8)
    cbar = fig.colorbar(image, ax=axes, shrink=0.8)
    cbar.set_label(f"iterations to the target (– = not reached in {results['steps']})",
                   fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _power(x: float) -> str:
    """``1e-3`` for powers of ten, else ``%g``."""
    e = round(math.log10(x))
    return f"1e{e}" if math.isclose(x, 10.0**e) else f"{x:g}"


def redraw(workdir: Path, out: Path) -> list[Path]:
    """``iterations.png`` in ``out`` from ``workdir/results.json``."""
    plot(workdir / "results.json", out / "iterations.png")
    return [out / "iterations.png"]


EXPERIMENT = Experiment(
    "baydin-hd", BaydinConfig(), build,
    "iterations to a training loss over a grid of alpha_0 and beta, SGD / SGDN / Adam with "
    "and without hypergradient descent (Baydin et al. 2018)", main, redraw)

MNIST = Experiment(
    "baydin-mnist",
    dataclasses.replace(BaydinConfig(), data="mnist", steps=2000, data_train_size=5000,
                        data_val_size=1000, data_test_size=1000),
    build,
    "Baydin et al. 2018's alpha_0 x beta grid on real MNIST: logistic regression and an MLP, "
    "SGD / SGDN / Adam with and without hypergradient descent", main, redraw)
