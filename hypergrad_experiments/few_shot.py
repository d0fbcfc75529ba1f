"""few-shot: N-way K-shot classification on held-out classes; MAML, FOMAML and baselines.

Run:  hypergrad run few-shot          (digits; about 2 minutes on 2 CPU cores, shared)
      hypergrad run few-shot-mnist --set data=idx:../shared/data/mnist-10k
      hypergrad run few-shot --set data=omniglot   (tfds's Omniglot, where it is prepared)

The standard few-shot protocol (Finn et al. 2017, "Model-Agnostic Meta-Learning for Fast
Adaptation of Deep Networks", §5.2) on small data: the classes are split in two, the
meta-training classes and the held-out (meta-test) classes. An episode picks ``ways``
classes of one side at random, in a random order that is its labels ``0 .. ways - 1``
(a fresh permutation per episode), and ``shots + queries`` distinct images of each:
``shots`` per class are the support set the network adapts on (``steps`` full-batch SGD
steps at ``inner_lr``), the other ``queries`` per class the query set it is scored on.
On digits and MNIST, ``test_classes`` (default 5-9) are held out and the network meta-trains
on the other five: a 5/5 split leaves enough held-out classes for 5-way episodes (each
then holds all five, in a random order, with fresh shots) and for 3-way ones (10 class
subsets). On Omniglot the held-out classes are tfds's ``test`` split (the 659 characters
of the evaluation alphabets) and meta-training reads ``train`` (964 characters of the
background alphabets), as in Lake et al.'s split; images are downsampled to 28x28.

Methods (``methods``), each scored on the same ``test_episodes`` held-out episodes:

- ``maml``: the initial weights meta-trained by exact reverse mode through the adaptation
  (``hg.meta.maml`` + ``hg.estimators.reverse()``), Adam at ``outer_lr`` for
  ``meta_steps`` meta-steps of ``meta_batch`` fresh episodes each (``hg.tune``);
- ``fomaml``: the same with the first-order estimate (``hg.estimators.first_order()``);
- ``metasgd``: MAML plus one learned inner learning rate per weight (Li et al. 2017);
- ``scratch``: no meta-training: the random initial weights MAML starts from, adapted the
  same way;
- ``pretrain``: the network trained by plain supervised learning (Adam, ``pretrain_steps``
  minibatches of 64) on every image of the meta-training classes with a head over those
  classes; the head is then replaced by a zero ``ways``-way head and adapted the same way.

The network is an MLP (``hidden`` units, ReLU) on the flattened images. The accuracy is
the mean over episodes of the query accuracy after adaptation, with a 95% confidence
interval (1.96 standard errors over episodes); the same adaptation is also scored on new
episodes of the meta-training classes. Writes ``results.json`` and ``few_shot.png`` (the
meta-training query loss, the held-out accuracy every ``eval_every`` meta-steps, and each
method's held-out accuracy).

Measured (seed 0, 5-way 1-shot, 3 steps at 0.1, 1000 meta-steps, 200 held-out episodes;
2 CPU cores shared with other jobs): on digits MAML 37.1 ± 1.2%, FOMAML 41.6 ± 1.2%,
Meta-SGD 36.6 ± 1.2%, no meta-training 31.5 ± 1.1%, pretrained 55.3 ± 1.2% (3 minutes
with all five; the default four about 2). Meta-training on five classes overfits them:
MAML's held-out accuracy peaks at 54.7% after 100 meta-steps and falls while its accuracy
on new episodes of the meta-training classes reaches 98.0%. On MNIST (``few-shot-mnist``,
300 images per class) MAML 36.6%, FOMAML 35.9%, no meta-training 42.0%, pretrained
32.6% (2.5 minutes). docs/gallery/few_shot.md has the tables and other adaptation
settings. These are 8x8 digits and a 10 000-image MNIST, not Omniglot or MiniImagenet:
not comparable with the paper's Table 1 (MAML 98.7% on Omniglot 5-way 1-shot).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

import hypergrad as hg
from hypergrad.config import Config, ConfigError
from hypergrad.data import INSTALL_TFDS, DataError
from hypergrad.experiment import Experiment, Problem
from hypergrad.plots import save_figure

METHODS = ("maml", "fomaml", "metasgd", "scratch", "pretrain")
META_TRAINED = ("maml", "fomaml", "metasgd")
LABELS = {"maml": "MAML", "fomaml": "FOMAML", "metasgd": "Meta-SGD",
          "scratch": "no meta-training", "pretrain": "pretrained"}
OMNIGLOT = "omniglot"
OMNIGLOT_SIDE = 28  # the usual downsampling of Omniglot's 105x105 characters
PRETRAIN_BATCH = 64


@dataclasses.dataclass(frozen=True)
class FewShotConfig(Config):
    """``ways``, ``shots`` and ``queries`` (per class) shape an episode; ``steps`` is the
    adaptation's SGD steps at ``inner_lr`` on the whole support set; ``meta_batch``
    episodes per meta-step; ``test_classes`` are held out (digits, MNIST);
    ``per_class`` caps the images kept per class (0: as many as the smallest class has);
    ``test_episodes`` held-out episodes score each method, and every ``eval_every``
    meta-steps the meta-trained ones (the curve of the figure; the reported accuracy is
    the one after ``meta_steps``)."""

    steps: int = 3
    meta_steps: int = 1000
    batch_size: int = 0
    outer_lr: float | None = 0.003
    loss: str = "ce"
    ways: int = 5
    shots: int = 1
    queries: int = 15
    meta_batch: int = 16
    inner_lr: float = 0.1
    hidden: int = 64
    test_classes: str = "5,6,7,8,9"
    per_class: int = 0
    test_episodes: int = 200
    methods: str = "maml,fomaml,scratch,pretrain"
    pretrain_steps: int = 500
    pretrain_lr: float = 0.003
    eval_every: int = 50

    def space(self) -> hg.HyperSpace:
        """A stand-in: the tuned hyperparameter is the flat vector of initial weights,
        ``"init"``, whose size comes from the data (``hg.meta.maml`` declares it)."""
        return hg.HyperSpace({"init": hg.real(0.0)})

    def validate(self) -> FewShotConfig:
        # Omniglot is read here, not by hypergrad.data: the base check sees digits.
        base = dataclasses.replace(self, data="digits") if self.data == OMNIGLOT else self
        Config.validate(base)
        if self.loss != "ce":
            raise ConfigError(f"few-shot classifies with cross-entropy; loss must be ce, got "
                              f"{self.loss}")
        if self.batch_size != 0:
            raise ConfigError(f"few-shot adapts on the whole support set; batch_size must be "
                              f"0, got {self.batch_size}")
        if self.hparam_options:
            raise ConfigError("few-shot tunes the initial weights (hg.meta.maml); hparams.* "
                              "options do not apply")
        for name in ("ways", "shots", "queries", "meta_batch", "hidden", "test_episodes",
                     "pretrain_steps",
                     "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.ways < 2:
            raise ConfigError(f"ways must be at least 2, got {self.ways}")
        if self.per_class < 0:
            raise ConfigError(f"per_class must be >= 0 (0: all), got {self.per_class}")
        if self.per_class and self.per_class < self.shots + self.queries:
            raise ConfigError(f"per_class ({self.per_class}) must be at least shots + "
                              f"queries ({self.shots + self.queries})")
        for name in ("inner_lr", "pretrain_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name):g}")
        self.method_list()
        if self.data != OMNIGLOT:
            self.held_out()
        return self

    def method_list(self) -> list[str]:
        """``methods`` parsed: some of :data:`METHODS`, in the given order."""
        names = [m.strip() for m in self.methods.split(",") if m.strip()]
        bad = [m for m in names if m not in METHODS]
        if bad or not names or len(set(names)) != len(names):
            raise ConfigError(f"methods must be distinct names among {', '.join(METHODS)} "
                              f"separated by commas, got {self.methods!r}")
        return names

    def held_out(self) -> list[int]:
        """``test_classes`` parsed; both sides must hold at least ``ways`` classes (the
        dataset's class count is checked when it is loaded)."""
        try:
            classes = sorted({int(c) for c in self.test_classes.split(",")})
        except ValueError:
            classes = []
        if not classes or min(classes) < 0:
            raise ConfigError(f"test_classes must be class indices separated by commas, got "
                              f"{self.test_classes!r}")
        if len(classes) < self.ways:
            raise ConfigError(f"{self.ways}-way episodes need at least {self.ways} held-out "
                              f"classes; test_classes has {len(classes)}")
        return classes


# --- episodes ------------------------------------------------------------------------------

def episode_indices(key: jax.Array, num_classes: int, per_class: int, ways: int,
                    examples: int) -> tuple[jax.Array, jax.Array]:
    """``(classes[ways], picks[ways, examples])``: ``ways`` distinct classes of a pool of
    ``num_classes`` in a random order (class ``classes[i]`` gets the episode's label
    ``i``: a fresh permutation of the labels per episode) and, per class, ``examples``
    distinct indices among its ``per_class`` images."""
    pick_classes, pick_images = jax.random.split(key)
    classes = jax.random.permutation(pick_classes, num_classes)[:ways]
    keys = jax.random.split(pick_images, ways)
    picks = jax.vmap(lambda k: jax.random.permutation(k, per_class)[:examples])(keys)
    return classes, picks


def sampler(ways: int, shots: int, queries: int):
    """``sample(key, pool) -> ((x, y), (x, y))``: one episode's support set (``ways *
    shots`` images) and query set (``ways * queries``), labels ``0 .. ways - 1``, from a
    pool ``{"images": [classes, per_class, H, W, C], "classes": [classes]}``."""

    def sample(key, pool):
        images = pool["images"]
        classes, picks = episode_indices(key, images.shape[0], images.shape[1], ways,
                                         shots + queries)
        x = images[classes[:, None], picks]  # [ways, shots + queries, H, W, C]
        shape = images.shape[2:]
        labels = jnp.arange(ways, dtype=jnp.int32)
        support = (x[:, :shots].reshape(ways * shots, *shape), jnp.repeat(labels, shots))
        query = (x[:, shots:].reshape(ways * queries, *shape), jnp.repeat(labels, queries))
        return support, query

    return sample


def by_class(x: np.ndarray, y: np.ndarray, classes: list[int], per_class: int,
             seed: int) -> dict[str, np.ndarray]:
    """A pool: ``per_class`` images of each of ``classes``, drawn by ``seed``."""
    rng = np.random.default_rng(seed)
    images = []
    for c in classes:
        (index,) = np.nonzero(y == c)
        images.append(x[rng.permutation(index)[:per_class]])
    return {"images": np.stack(images), "classes": np.asarray(classes, np.int32)}


def pools(config: FewShotConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(train_pool, test_pool)``: the meta-training and the held-out classes' images,
    each ``[classes, per_class, H, W, C]`` with the same ``per_class``."""
    if config.data == OMNIGLOT:
        return _omniglot(config)
    data = config.load_data()
    # Episodes are cut from every image the data keys load, whatever its split.
    x = np.concatenate([np.asarray(s[0]) for s in (data.train, data.val, data.test)])
    y = np.concatenate([np.asarray(s[1]) for s in (data.train, data.val, data.test)])
    held = config.held_out()
    if max(held) >= data.num_classes:
        raise ConfigError(f"test_classes names class {max(held)}, but {data.name} has "
                          f"{data.num_classes} classes (0 .. {data.num_classes - 1})")
    train = [c for c in range(data.num_classes) if c not in held]
    if len(train) < config.ways:
        raise ConfigError(f"{config.ways}-way episodes need at least {config.ways} "
                          f"meta-training classes; {data.name} leaves {len(train)} beside "
                          "test_classes")
    counts = np.bincount(y, minlength=data.num_classes)
    return _cut(x, y, train, held, int(counts.min()), config)


def _cut(x, y, train, held, smallest, config):
    per_class = min(smallest, config.per_class) if config.per_class else smallest
    if per_class < config.shots + config.queries:
        raise ConfigError(f"the smallest class has {smallest} images; an episode needs "
                          f"shots + queries = {config.shots + config.queries} of each")
    return (by_class(x, y, train, per_class, config.seed),
            by_class(x, y, held, per_class, config.seed + 1))


def omniglot_missing(data_dir: str | None) -> str | None:
    """``None`` where tfds's Omniglot is prepared (ArrayRecord files) in ``data_dir``
    (``None``: tfds's default), else the one line that says it is not, and how to
    prepare it; nothing is downloaded."""
    how = (f"prepare it on a machine with network (`{INSTALL_TFDS}` then `tfds build "
           "omniglot --file_format=array_record --data_dir DIR`), copy DIR here and --set "
           "data.data_dir=DIR")
    try:
        import tensorflow_datasets as tfds  # optional and heavy: only here
    except ImportError:
        return f"omniglot is not prepared (tfds is not installed); skipping: {how}"
    import logging

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # tfds warns on stderr about an empty folder
    try:
        prepared = tfds.builder(OMNIGLOT, data_dir=data_dir,
                                file_format="array_record").is_prepared()
    except Exception as e:  # a broken folder, a tfds without the builder
        return f"omniglot is not prepared (tfds: {type(e).__name__}); skipping: {how}"
    finally:
        absl.setLevel(level)
    return None if prepared else f"omniglot is not prepared (tfds); skipping: {how}"


def _omniglot(config: FewShotConfig):
    """Omniglot's background (train) and evaluation (test) characters, 28x28, ink = 1."""
    missing = omniglot_missing(config.data_dir or None)
    if missing:
        raise DataError(missing)
    import tensorflow_datasets as tfds

    sides = []
    for split in ("train", "test"):
        source = tfds.data_source(OMNIGLOT, split=split, data_dir=config.data_dir or None,
                                  builder_kwargs={"file_format": "array_record"},
                                  download=False)
        images, labels = [], []
        for start in range(0, len(source), 1000):  # 1000 characters of 105x105 at a time
            examples = [source[i] for i in range(start, min(start + 1000, len(source)))]
            ink = 1 - np.stack([e["image"][..., 0] for e in examples]).astype(np.float32) / 255
            images.append(np.asarray(jax.image.resize(
                ink, (len(ink), OMNIGLOT_SIDE, OMNIGLOT_SIDE), "linear"), config.dtype))
            labels += [int(e["label"]) for e in examples]
        sides.append((np.concatenate(images)[..., None], np.asarray(labels)))
    (xt, yt), (xh, yh) = sides
    x, y = np.concatenate([xt, xh]), np.concatenate([yt, yh])
    train, held = sorted(set(yt.tolist())), sorted(set(yh.tolist()))
    smallest = int(min(np.sum(y == c) for c in train + held))
    return _cut(x, y, train, held, smallest, config)


# --- the network, the tasks and the scores -------------------------------------------------

def network(config: FewShotConfig, image_shape, outputs: int):
    """``apply(params, x) -> logits`` and the initial params of the MLP."""
    sizes = (math.prod(image_shape), config.hidden, outputs)
    model = hg.models.MLP(nnx.Rngs(config.seed), sizes, param_dtype=jnp.dtype(config.dtype))
    apply, params = hg.models.functional(model)
    return (lambda p, x: apply(p, x, 0.0)), params  # slope 0: ReLU


def meta_task(config: FewShotConfig, train_pool, method: str = "maml") -> tuple[hg.Task, Any]:
    """The meta-learning task over ``train_pool``'s episodes, and ``apply``."""
    apply, params = network(config, train_pool["images"].shape[2:], config.ways)

    def loss(p, batch):
        x, y = batch
        return hg.models.cross_entropy(apply(p, x), y)

    tasks = hg.tasks.Tasks(sampler(config.ways, config.shots, config.queries),
                           config.meta_batch, pool=jax.tree.map(jnp.asarray, train_pool))
    task = hg.meta.maml(params, loss, tasks, steps=config.steps, inner_lr=config.inner_lr,
                        learn_lr="per_parameter" if method == "metasgd" else False)
    return task, apply


def episode_scores(task: hg.Task, apply, phi, key: jax.Array) -> dict[str, jax.Array]:
    """Per episode of ``task.tasks`` drawn from ``key``: the query loss and accuracy after
    adapting from ``phi`` (:func:`hypergrad.tasks.each`: the episodes and keys the
    meta-objective draws from ``key``)."""

    def one(episode, phi, k):
        value, aux = hg.unroll.objective(episode, phi, k)
        images, labels = episode.val_data
        return {"loss": value, "accuracy": hg.models.accuracy(apply(aux["params"], images),
                                                             labels)}

    return hg.tasks.each(one, task, phi, key)


def held_out(task: hg.Task, test_pool, episodes: int) -> hg.Task:
    """``task`` drawing ``episodes`` episodes of the held-out classes."""
    return task.replace(tasks=task.tasks.replace(batch=episodes,
                                                 pool=jax.tree.map(jnp.asarray, test_pool)))


def interval(values) -> dict[str, float]:
    """Mean, standard deviation and the 95% confidence interval's half-width."""
    values = np.asarray(values, np.float64)
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "std": std,
            "ci95": 1.96 * std / math.sqrt(len(values))}


def with_init(task: hg.Task, params) -> dict[str, Any]:
    """``task``'s start with the initial weights ``params``."""
    phi = dict(task.space.init())
    phi["init"] = task.space.constraints["init"].to_phi(ravel_pytree(params)[0])
    return phi


def pretrained(config: FewShotConfig, train_pool, key: jax.Array, like):
    """Supervised pretraining on every image of the meta-training classes; returns
    weights shaped like ``like`` (a ``ways``-way network) with the body pretrained and a
    zero head."""
    images = jnp.asarray(train_pool["images"])
    classes, per_class = images.shape[:2]
    x = images.reshape(classes * per_class, *images.shape[2:])
    y = jnp.repeat(jnp.arange(classes, dtype=jnp.int32), per_class)
    apply, params = network(config, images.shape[2:], classes)
    opt = optax.adam(config.pretrain_lr)

    def step(carry, k):
        p, state = carry
        i = jax.random.randint(k, (PRETRAIN_BATCH,), 0, len(y))
        grads = jax.grad(lambda p: hg.models.cross_entropy(apply(p, x[i]), y[i]))(p)
        updates, state = opt.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), None

    @jax.jit
    def train(p, key):
        keys = jax.random.split(key, config.pretrain_steps)
        return jax.lax.scan(step, (p, opt.init(p)), keys)[0][0]

    body = train(params, key)
    head = len(body["layers"]) - 1
    out = jax.tree.map(jnp.zeros_like, like)
    out["layers"] = {i: (body["layers"][i] if i != head else out["layers"][i])
                     for i in like["layers"]}
    return out


def build(config: FewShotConfig) -> Problem:
    """MAML's task on the meta-training classes; ``evaluate`` scores the initial weights in
    ``hparams["init"]`` on ``test_episodes`` held-out episodes after adaptation (``params``,
    one task's adapted weights, are not used)."""
    train_pool, test_pool = pools(config)
    task, apply = meta_task(config, train_pool)
    test = held_out(task, test_pool, config.test_episodes)
    key = _keys(config)["test"]

    def evaluate(params, hparams):
        del params
        phi = dict(task.space.init())
        phi["init"] = hparams["init"]
        scores = episode_scores(test, apply, phi, key)
        return {"test_loss": jnp.mean(scores["loss"]),
                "test_accuracy": jnp.mean(scores["accuracy"])}

    return Problem(task, evaluate)


def _keys(config: FewShotConfig) -> dict[str, jax.Array]:
    root = jax.random.key(config.seed)
    return {name: jax.random.fold_in(root, i)
            for i, name in enumerate(("meta", "test", "pretrain"))}


def run(config: FewShotConfig, progress: bool = False) -> dict[str, Any]:
    """Every method of ``config``, scored on the same held-out episodes: the results."""
    if config.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    train_pool, test_pool = pools(config)
    keys = _keys(config)
    results: dict[str, Any] = {
        "data": config.data, "ways": config.ways, "shots": config.shots,
        "queries": config.queries, "steps": config.steps, "inner_lr": config.inner_lr,
        "meta_steps": config.meta_steps, "meta_batch": config.meta_batch,
        "test_episodes": config.test_episodes, "per_class": int(train_pool["images"].shape[1]),
        "train_classes": train_pool["classes"].tolist(),
        "test_classes": test_pool["classes"].tolist(), "methods": {}}
    for method in config.method_list():
        t0 = time.perf_counter()
        task, apply = meta_task(config, train_pool, method)
        entry: dict[str, Any] = {}
        test = held_out(task, test_pool, config.test_episodes)
        seen = task.replace(tasks=task.tasks.replace(batch=config.test_episodes))
        scorer = jax.jit(lambda phi, tasks, apply=apply: episode_scores(
            tasks, apply, phi, keys["test"]))  # one compile for both pools of one shape
        score = functools.partial(scorer, tasks=test)
        if method in META_TRAINED:
            estimator = (hg.estimators.first_order() if method == "fomaml"
                         else hg.estimators.reverse())
            curve = [[0, float(np.mean(score(task.space.init())["accuracy"]))]]

            def callback(record, state, score=score, curve=curve):
                done = record["meta_step"] + 1
                if done % config.eval_every == 0:
                    phi = jax.tree.map(lambda leaf: leaf[0], state.phi)  # the one member
                    curve.append([done, float(np.mean(score(phi)["accuracy"]))])

            history = hg.tune(task, estimator, optax.adam(config.outer_lr or 1e-3),
                              meta_steps=config.meta_steps, key=keys["meta"],
                              callback=callback)
            phi = history.final.phi
            entry["held_out_curve"] = curve
            entry["meta_loss"] = [float(v) for v in np.asarray(history.val_loss)]
            entry["meta_step_seconds"] = float(np.median(history.seconds))
            if method == "metasgd":
                lr = ravel_pytree(task.space.constrain(phi)["learning_rate"])[0]
                entry["learned_lr"] = interval(np.asarray(lr)) | {
                    "min": float(lr.min()), "max": float(lr.max())}
        elif method == "pretrain":
            like = network(config, train_pool["images"].shape[2:], config.ways)[1]
            phi = with_init(task, pretrained(config, train_pool, keys["pretrain"], like))
        else:
            phi = task.space.init()
        scores = jax.device_get(score(phi))
        entry["accuracy"] = interval(scores["accuracy"])
        entry["loss"] = interval(scores["loss"])
        # the same adaptation on new episodes of the meta-training classes: the gap to the
        # held-out accuracy is what meta-training learned about its own classes only
        entry["train_classes_accuracy"] = interval(
            jax.device_get(scorer(phi, seen))["accuracy"])
        entry["seconds"] = time.perf_counter() - t0
        results["methods"][method] = entry
        if progress:
            a = entry["accuracy"]
            print(f"{LABELS[method]:18s} {100 * a['mean']:5.1f}% ± {100 * a['ci95']:.1f}% "
                  f"({entry['seconds']:.0f} s)", flush=True)
    return results


def main(config: FewShotConfig, workdir: Path, progress: bool) -> dict:
    """Run every method; write ``results.json`` and ``few_shot.png``."""
    results = run(config, progress)
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(workdir / "results.json", workdir / "few_shot.png")
    return {"accuracy": {m: r["accuracy"] for m, r in results["methods"].items()},
            "test_episodes": results["test_episodes"]}


def plot(results_path: Path, path: Path) -> None:
    """From ``results.json``: the meta-training query loss on the meta-training classes
    (a running mean over 20 meta-steps), the held-out accuracy during meta-training, and
    each method's held-out accuracy with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = json.loads(Path(results_path).read_text())
    methods = r["methods"]
    fig, (train, curves, bars) = plt.subplots(1, 3, figsize=(12.5, 3.3), dpi=90)
    for i, (name, m) in enumerate(methods.items()):
        color = f"C{i}"
        if "meta_loss" in m:
            loss = np.asarray(m["meta_loss"])
            width = min(20, len(loss))
            smooth = np.convolve(loss, np.ones(width) / width, mode="valid")
            train.plot(np.arange(width, len(loss) + 1), smooth, color=color,
                       label=LABELS[name])
            steps, acc = np.asarray(m["held_out_curve"]).T
            curves.plot(steps, 100 * acc, "o-", markersize=3, color=color, label=LABELS[name])
        else:
            curves.axhline(100 * m["accuracy"]["mean"], color=color, linestyle="--",
                           label=LABELS[name])
    train.set(xlabel="meta-step", ylabel="query loss after adaptation",
              title=f"meta-training classes {_span(r['train_classes'])}")
    curves.set(xlabel="meta-step", ylabel="query accuracy (%)",
               title=f"held-out classes {_span(r['test_classes'])}")
    for ax in (train, curves):
        if ax.lines:
            ax.legend(fontsize=7)
    names = list(methods)
    means = [100 * methods[n]["accuracy"]["mean"] for n in names]
    errors = [100 * methods[n]["accuracy"]["ci95"] for n in names]
    bars.bar(range(len(names)), means, yerr=errors, capsize=4,
             color=[f"C{i}" for i in range(len(names))])
    bars.axhline(100 / r["ways"], color="0.5", linestyle=":", label="chance")
    bars.set_xticks(range(len(names)), [LABELS[n] for n in names], fontsize=7, rotation=15)
    bars.set(ylabel="query accuracy (%)", ylim=(0, 100),
             title=f"{r['data']}: {r['ways']}-way {r['shots']}-shot, {r['test_episodes']} "
                   "held-out episodes")
    bars.legend(fontsize=7, loc="upper right")
    for i, v in enumerate(means):
        bars.text(i, v / 2, f"{v:.1f}", ha="center", color="white", fontsize=8)
    save_figure(fig, path)


def _span(classes: list[int]) -> str:
    if len(classes) > 6:
        return f"{len(classes)} of them"
    return ",".join(map(str, classes))


def redraw(workdir: Path, out: Path) -> list[Path]:
    """``few_shot.png`` in ``out`` from ``workdir/results.json``."""
    plot(workdir / "results.json", out / "few_shot.png")
    return [out / "few_shot.png"]


EXPERIMENT = Experiment(
    "few-shot", FewShotConfig(), build,
    "5-way 1-shot classification on held-out digit classes: MAML, FOMAML, no "
    "meta-training and a pretrained network, mean accuracy and 95% interval "
    "(Finn et al. 2017's protocol; data=omniglot where tfds has it)", main, redraw)

MNIST = Experiment(
    "few-shot-mnist",
    dataclasses.replace(FewShotConfig(), data="mnist", data_train_size=1000,
                        data_val_size=400, per_class=300),
    build,
    "few-shot on real MNIST: 5-way 1-shot on held-out classes 5-9, MAML / FOMAML / no "
    "meta-training / pretrained", main, redraw)
