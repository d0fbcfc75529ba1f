"""Write the notebooks under ``docs/notebooks/`` from the cells below, executed so that their
outputs (text and figures) read on GitHub.

Run:  python scripts/make_notebooks.py              (about 2 minutes on 2 CPU cores)
      python scripts/make_notebooks.py --no-execute (sources only)

The notebooks are generated so that their source stays reviewable here; the documentation
build executes them from a clean kernel (myst-nb, ``nb_execution_raise_on_error``: an error
fails the build, which CI runs), and ``tests/test_notebooks.py`` checks that each notebook
is this script's and is in the site.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

QUICKSTART = [
    ("md", """# hypergrad quickstart

A bilevel problem from plain functions: a small network of our own, trained by SGD for
`T` steps on the 8×8 digits, whose **learning rate** and a **custom hyperparameter** (an
L2 penalty that only our loss reads) are tuned by the gradient of the validation loss.

We compute the hypergradient with two estimators, check both against central finite
differences, and run a short outer loop with each hyper-update: gradient descent,
nonlinear conjugate gradient and Adam. About a minute on 2 CPU cores."""),
    ("code", """import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt

import hypergrad as hg

jax.config.update("jax_enable_x64", True)  # float64, for the finite-difference check"""),
    ("md", """## The problem

`train_loss(params, hparams, batch)` reads our custom hyperparameter `l2` by name; the
inner optimizer `hg.inner.sgd` reads `learning_rate` (momentum is fixed at 0.5). The
validation loss is the plain cross-entropy."""),
    ("code", """data = hg.data.load("digits", seed=0, train_size=300, val_size=200,
                    dtype=jnp.float64)
x_train, y_train = data.train

def init(key, sizes=(64, 32, 10)):
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": jax.random.normal(k, (m, n)) / jnp.sqrt(m), "b": jnp.zeros(n)}
            for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)]

def predict(params, x):
    x = x.reshape(x.shape[0], -1)  # (N, 8, 8, 1) images -> (N, 64)
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]

def cross_entropy(params, batch):
    x, y = batch
    logp = jax.nn.log_softmax(predict(params, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

def train_loss(params, hparams, batch):
    penalty = sum(jnp.sum(layer["w"] ** 2) for layer in params)
    return cross_entropy(params, batch) + hparams["l2"] * penalty

def val_loss(params, hparams, batch):
    return cross_entropy(params, batch)

space = hg.HyperSpace({"learning_rate": hg.positive(0.05), "l2": hg.positive(1e-3)})
task = hg.Task(params=init(jax.random.key(0)), train_loss=train_loss, val_loss=val_loss,
               train_data=data.train, val_data=data.val, space=space,
               optimizer=hg.inner.sgd(momentum=0.5), steps=60, batch_size=50)
phi = task.space.init()  # unconstrained coordinates: log(0.05), log(1e-3)
key = jax.random.key(1)
task.space"""),
    ("md", """## Two estimators, both checked

Reverse mode differentiates through the whole unroll (`lax.scan`); forward mode pushes
one tangent per hyperparameter through it. `check_hypergrad` compares an estimator with
central differences of the objective along each coordinate of `phi`."""),
    ("code", """estimators = {"reverse": hg.estimators.reverse(),
              "forward": hg.estimators.forward()}
for name, est in estimators.items():
    value, grad, _ = jax.jit(est)(task, phi, key)
    err = hg.check_hypergrad(est, task, phi, key)
    print(f"{name:8s} val loss {float(value):.4f}  "
          f"d/dlog lr {float(grad['learning_rate']):+.5f}  d/dlog l2 {float(grad['l2']):+.5f}  "
          f"max rel. error vs central differences {err:.1e}")"""),
    ("md", """## A short outer loop with each hyper-update

`hg.tune` runs the outer loop: each meta-step is one jitted function (the hypergradient,
the hyper-update (any optax transformation; `hg.outer` has nonlinear CG) and a guard that
rejects non-finite or divergent values before they reach `phi`). Nonlinear CG runs a line
search on the validation objective, so it evaluates more training runs per meta-step.
`history.final` is the last accepted point with its validation loss, `history.best` the
best one."""),
    ("code", """hyper_updates = {"gd": hg.outer.gradient_descent(1.0),
                 "ncg": hg.outer.nonlinear_cg(1.0),
                 "adam": hg.outer.adam(0.1)}
history = {}
for name, opt in hyper_updates.items():
    t0 = time.perf_counter()
    h = hg.tune(task, hg.estimators.reverse(), opt, meta_steps=12, key=key)
    history[name] = h
    print(f"{name:5s} val loss {h.val_loss[0]:.4f} -> {h.final.val_loss:.4f}  "
          f"lr {float(h.final.hparams['learning_rate']):.3g}  "
          f"l2 {float(h.final.hparams['l2']):.3g}  ({time.perf_counter() - t0:.1f} s)")"""),
    ("code", """fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
for name, h in history.items():
    for ax, values in zip(axes, [h.val_loss, h.hparams["learning_rate"], h.hparams["l2"]],
                          strict=True):
        ax.plot(values, marker=".", label=name)
for ax, title in zip(axes, ["validation loss", "learning rate", "L2 penalty"],
                    strict=True):
    ax.set_title(title)
    ax.set_xlabel("meta-step")
    ax.grid(alpha=0.3)
axes[1].set_yscale("log")
axes[2].set_yscale("log")
axes[0].legend()
fig.tight_layout()"""),
    ("md", """## Where next

- Spread a hyperparameter over the layers and steps:
  `hg.positive(0.05, per="layer", schedule="per_step")`.
- Other estimators: `hg.estimators.truncated(window)`, `implicit("cg")` (for
  hyperparameters of the loss, such as `l2`), `reversible()`.
- The same loop with progress, metrics, checkpoints and figures: `hypergrad run`."""),
]

CUSTOM = [
    ("md", """# A new kind of hyperparameter: data-augmentation strength

Any array that a task function reads from `hparams` can be tuned. Here the training
inputs are perturbed with Gaussian noise of standard deviation `noise` — an augmentation
whose strength is usually grid-searched. Written with the reparameterization
`x + noise * eps`, where `eps` is drawn once per example and kept with the data, the
training loss is a smooth function of `noise`, so its hypergradient exists and is exact.
We check it against finite differences, then tune it per input **pixel group** (a
per-row strength, a vector hyperparameter) together with the learning rate."""),
    ("code", """import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import hypergrad as hg

jax.config.update("jax_enable_x64", True)"""),
    ("code", """data = hg.data.load("digits", seed=0, train_size=200, val_size=300,
                    dtype=jnp.float64)
x, y = data.train
eps = jax.random.normal(jax.random.key(7), x.shape)  # fixed noise draws, one per example

model = hg.models.MLP(nnx.Rngs(0), sizes=(64, 32, 10), param_dtype=jnp.float64)
apply, params = hg.models.functional(model)

def loss(params, inputs, labels):
    return hg.models.cross_entropy(apply(params, inputs, 0.0), labels)

def train_loss(params, hparams, batch):
    xb, yb, eb = batch
    # One strength per image row: images are (N, 8, 8, 1), the rows are axis 1.
    sigma = hparams["noise"].reshape(1, 8, 1, 1)
    return loss(params, xb + sigma * eb, yb)

def val_loss(params, hparams, batch):
    return loss(params, *batch)

space = hg.HyperSpace({"learning_rate": hg.positive(0.2), "noise": hg.positive(np.full(8, 0.3))})
task = hg.Task(params=params, train_loss=train_loss, val_loss=val_loss,
               train_data=(x, y, eps), val_data=data.val, space=space,
               optimizer=hg.inner.sgd(momentum=0.9), steps=80, batch_size=50)
phi, key = task.space.init(), jax.random.key(0)"""),
    ("code", """value, grad, _ = jax.jit(hg.estimators.reverse())(task, phi, key)
print("validation loss", float(value))
print("d/dlog noise per row", np.round(np.asarray(grad["noise"]), 5))
print("max rel. error vs central differences (random directions):",
      f"{hg.check_hypergrad(hg.estimators.reverse(), task, phi, key, directions=4):.1e}")"""),
    ("md", """Tune both with Adam hyper-updates. The strength of each row moves on its own:
rows the network relies on less can take more noise."""),
    ("code", """history = hg.tune(task, hg.estimators.reverse(), hg.outer.adam(0.1), meta_steps=25,
                  key=key)
print("validation loss", history.val_loss[0], "->", history.final.val_loss)
print("noise per row  ", np.round(history.final.hparams["noise"], 3))"""),
    ("code", """fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
a.plot(history.val_loss, marker=".")
a.set_title("validation loss")
a.set_xlabel("meta-step")
rows = history.hparams["noise"]
for r in range(rows.shape[1]):
    b.plot(rows[:, r], label=f"row {r}")
b.set_title("noise strength per image row")
b.set_xlabel("meta-step")
b.legend(fontsize=7, ncol=2)
for ax in (a, b):
    ax.grid(alpha=0.3)
fig.tight_layout()"""),
    ("md", """## The recipe

1. Read the hyperparameter from `hparams` by name in any task function
   (`train_loss`, `val_loss`, or `params` as a function of `(key, hparams)`).
2. Declare it in the `HyperSpace` with its constraint (`positive`, `unit`, `bounded`,
   `real`); an array value gives one hyperparameter per entry, `per=`/`schedule=` spread
   it over the layers and steps.
3. Check it with `hg.check_hypergrad` in float64 before trusting it.

A space that names a hyperparameter no task function reads is refused when the `Task`
is built, so a typo cannot silently tune nothing."""),
]


TUNE = [
    ("md", """# Tune your model: a Flax MLP on a regression problem

Fit `y = sin(x) + noise` with a small Flax MLP trained by SGD, and let `hg.tune` choose
the **learning rate** and the **L2 penalty** by the gradient of the validation MSE. The
tuning itself is the space, the task and one call. About 20 seconds on 2 CPU cores."""),
    ("code", """import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import hypergrad as hg

rng = np.random.default_rng(0)
x = rng.uniform(-3, 3, (160, 1)).astype(np.float32)
y = np.sin(x) + 0.1 * rng.normal(size=x.shape).astype(np.float32)
train, val = (x[:100], y[:100]), (x[100:], y[100:])

class MLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(1, 32, rngs=rngs)
        self.out = nnx.Linear(32, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))

graph, params = nnx.split(MLP(nnx.Rngs(0)))  # the loop sees pure pytrees

def mse(params, batch):
    return jnp.mean((nnx.merge(graph, params)(batch[0]) - batch[1]) ** 2)

def train_loss(params, hparams, batch):
    l2 = sum(jnp.sum(w ** 2) for w in jax.tree.leaves(params))
    return mse(params, batch) + hparams["l2"] * l2"""),
    ("md", """## Tuning: the whole of it"""),
    ("code", """space = hg.HyperSpace({"learning_rate": hg.positive(0.01), "l2": hg.positive(0.03)})
task = hg.Task(params=params, train_loss=train_loss, val_loss=lambda p, hp, b: mse(p, b),
               train_data=train, val_data=val, space=space,
               optimizer=hg.inner.sgd(momentum=0.9), steps=100)
history = hg.tune(task, hg.estimators.reverse(), optax.adam(0.2), meta_steps=30,
                  key=jax.random.key(0))
print(f"validation MSE {history.val_loss[0]:.4f} -> {history.final.val_loss:.4f} "
      f"(best {history.best.val_loss:.4f} at meta-step {history.best.meta_step})")
print({k: float(v) for k, v in history.final.hparams.items()})"""),
    ("md", """`history` holds every meta-step (`history.val_loss`, `history.hparams[...]` in
natural units, `history.accepted`), the final and best points (finite by construction:
a step into divergence is rejected and the step halved), and draws the same figures as
`hypergrad run`:"""),
    ("code", """figures = history.plot()"""),
    ("md", """Next: `population=8` tunes eight starts at once in one vmapped program;
`history.save("history.json")` keeps it; `hg.estimators.truncated(10)` with `online=True`
tunes while training, in one training run."""),
]


META = [
    ("md", """# Meta-learning: MAML and Meta-SGD on sinusoids

Sinusoid regression (Finn et al. 2017, §5.1): each task is `y = a sin(x + b)` with an
amplitude `a ~ U[0.1, 5]` and a phase `b ~ U[0, π]`; a network sees 10 points of it (the
support set), takes one gradient step, and is scored on 10 others (the query set).
MAML learns the initial weights that one step adapts best; Meta-SGD also learns one step
size per weight. Both are `hg.meta.maml` tasks, meta-trained with `hg.tune`. About 30 s
on 2 CPU cores."""),
    ("code", """import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import hypergrad as hg

SHOTS = 10


def draw(key):
    \"\"\"A task's amplitude, phase and 20 points x.\"\"\"
    ka, kb, kx = jax.random.split(key, 3)
    return (jax.random.uniform(ka, (), minval=0.1, maxval=5.0),
            jax.random.uniform(kb, (), minval=0.0, maxval=jnp.pi),
            jax.random.uniform(kx, (2 * SHOTS, 1), minval=-5.0, maxval=5.0))


def sinusoid(key):
    \"\"\"One task: (support, query), each (x, y) with 10 points.\"\"\"
    a, b, x = draw(key)
    y = a * jnp.sin(x + b)
    return (x[:SHOTS], y[:SHOTS]), (x[SHOTS:], y[SHOTS:])


def predict(w, x):
    h = jnp.tanh(x @ w["w1"] + w["b1"][None])
    h = jnp.tanh(h @ w["w2"] + w["b2"][None])
    return h @ w["w3"] + w["b3"][None]


def mse(w, batch):
    x, y = batch
    return jnp.mean((predict(w, x) - y) ** 2)


k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
params = {"w1": jax.random.normal(k1, (1, 40)), "b1": jnp.zeros(40),
          "w2": jax.random.normal(k2, (40, 40)) / jnp.sqrt(40.0), "b2": jnp.zeros(40),
          "w3": jax.random.normal(k3, (40, 1)) / jnp.sqrt(40.0), "b3": jnp.zeros(1)}
tasks = hg.tasks.Tasks(sinusoid, batch=10)  # 10 tasks per meta-step"""),
    ("md", """## MAML

One adaptation step at rate 0.01 on the support set; the meta-loss is the query MSE
after it. `hg.estimators.reverse()` differentiates through the step (second order);
`hg.tune` draws 10 fresh tasks every meta-step."""),
    ("code", """maml = hg.meta.maml(params, mse, tasks, steps=1, inner_lr=0.01)
history = hg.tune(maml, hg.estimators.reverse(), optax.adam(0.01), meta_steps=500,
                  key=jax.random.key(1))
print(f"meta-loss (query MSE after one step): first meta-steps "
      f"{np.mean(history.val_loss[:20]):.2f}, last {np.mean(history.val_loss[-20:]):.2f}")"""),
    ("md", """## After adaptation, before and after meta-training

The query MSE on 200 new tasks after k = 0 … 10 adaptation steps at rate 0.01, from the
random start and from the meta-learned one (MAML was trained for k = 1 only)."""),
    ("code", """def curve(init, lr, support, query, k=10):
    \"\"\"Query MSE after 0..k SGD steps from init (lr: a scalar or per weight).\"\"\"
    def step(w, _):
        g = jax.grad(mse)(w, support)
        w = jax.tree.map(lambda p, r, d: p - r * d, w, lr, g)
        return w, mse(w, query)
    _, losses = jax.lax.scan(step, init, None, length=k)
    return jnp.concatenate([mse(init, query)[None], losses])


support, query = jax.vmap(sinusoid)(jax.random.split(jax.random.key(99), 200))
start = maml.params(None, maml.space.constrain(maml.space.init()))
learned = maml.params(None, history.final.hparams)
lr01 = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
mean_curve = jax.jit(jax.vmap(curve, in_axes=(None, None, 0, 0)))
before = mean_curve(start, lr01, support, query).mean(0)
after = mean_curve(learned, lr01, support, query).mean(0)

fig, (ax, fit) = plt.subplots(1, 2, figsize=(9, 3.2))
ax.plot(before, "o-", label="random start")
ax.plot(after, "o-", label="MAML start")
ax.set(xlabel="adaptation steps (rate 0.01)", ylabel="query MSE, 200 new tasks", yscale="log")
ax.legend()
# one new task: the function, its 10 support points and the fits after one step
x = jnp.linspace(-5, 5, 200)[:, None]
(xs, ys), _ = sinusoid(jax.random.key(7))
def one_step(w):
    return jax.tree.map(lambda p, g: p - 0.01 * g, w, jax.grad(mse)(w, (xs, ys)))

a, b, _ = draw(jax.random.key(7))
fit.plot(x[:, 0], a * jnp.sin(x[:, 0] + b), "k--", label="the task")
fit.scatter(xs[:, 0], ys[:, 0], color="k", zorder=3, label="support")
fit.plot(x[:, 0], predict(one_step(start), x)[:, 0], label="random start, 1 step")
fit.plot(x[:, 0], predict(one_step(learned), x)[:, 0], label="MAML start, 1 step")
fit.set(xlabel="x", ylabel="y")
fit.legend(fontsize=8)
plt.tight_layout()
print(f"query MSE after one step: random start {before[1]:.2f}, MAML start {after[1]:.2f}")"""),
    ("md", """## Meta-SGD: a learned step size per weight

`learn_lr="per_parameter"` adds a hyperparameter `learning_rate` laid out like the
weights (positive: tuned in log units), read by the inner SGD. Same budget as MAML."""),
    ("code", """meta_sgd = hg.meta.maml(params, mse, tasks, steps=1, inner_lr=0.01,
                        learn_lr="per_parameter")
history_sgd = hg.tune(meta_sgd, hg.estimators.reverse(), optax.adam(0.01), meta_steps=500,
                      key=jax.random.key(1))
rates = history_sgd.final.hparams["learning_rate"]
learned_sgd = meta_sgd.params(None, history_sgd.final.hparams)
after_sgd = mean_curve(learned_sgd, rates, support, query).mean(0)
print(f"query MSE after one step: MAML {after[1]:.2f}, Meta-SGD {after_sgd[1]:.2f}")
for name, r in rates.items():
    r = np.asarray(r)
    print(f"{name:3s} learned rates: median {np.median(r):.4f}, "
          f"range {r.min():.4f} .. {r.max():.4f}")

fig, ax = plt.subplots(figsize=(5, 3))
ax.hist([np.log10(np.ravel(rates[n])) for n in rates], bins=30, stacked=True, label=list(rates))
ax.axvline(np.log10(0.01), color="k", linestyle=":", label="start, 0.01")
ax.set(xlabel="log10 of the learned step size", ylabel="weights")
ax.legend(fontsize=8)
plt.tight_layout()"""),
    ("md", """Meta-SGD's rates spread over orders of magnitude from their common start: the
meta-gradient decides, weight by weight, how far one step should move. See the
[meta-learning guide](../guides/meta_learning.md) for FOMAML, iMAML, scoring on held-out
tasks and a third level (`hg.meta.nest`)."""),
]


def write(path: Path, cells: list[tuple[str, str]], execute: bool) -> None:
    nb = new_notebook(cells=[new_markdown_cell(src) if kind == "md" else new_code_cell(src)
                             for kind, src in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    if execute:
        import os

        import nbclient

        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(nb, path)


def main() -> None:
    import sys

    execute = "--no-execute" not in sys.argv[1:]
    root = Path(__file__).resolve().parent.parent / "docs" / "notebooks"
    root.mkdir(exist_ok=True)
    write(root / "quickstart.ipynb", QUICKSTART, execute)
    write(root / "custom_hyperparameter.ipynb", CUSTOM, execute)
    write(root / "tune_your_model.ipynb", TUNE, execute)
    write(root / "meta_learning.ipynb", META, execute)


if __name__ == "__main__":
    main()
