"""Run checkpoints: pytrees of arrays plus JSON metadata in one ``.npz``, written atomically.

The format cannot execute code when loaded (no pickle): arrays are stored as numbered
``.npz`` entries and restored into the tree structure of a template, and the metadata is
a JSON string. A checkpoint is written to a temporary file and renamed over the old one,
so a kill at any moment leaves either the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hypergrad.config import ConfigError

PyTree = Any


def save(path: str | Path, tree: PyTree, meta: dict[str, Any]) -> None:
    """Write the leaves of ``tree`` and the JSON-ready ``meta`` to ``path`` atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    arrays = {f"leaf_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}
    with open(tmp, "wb") as f:
        np.savez(f, __meta__=np.asarray(json.dumps(meta)), **arrays)  # type: ignore[arg-type]
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str | Path, template: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Read a checkpoint into the structure, shapes and dtypes of ``template``.

    Raises:
      ConfigError: the file is unreadable, truncated, or does not match ``template``;
        the message names the file and says how to go on.
    """
    path = Path(path)
    leaves, treedef = jax.tree.flatten(template)
    fix = f"remove it (and {path.name}.tmp, if any) to restart the run from its start"
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["__meta__"]))
            stored = [data[f"leaf_{i}"] for i in range(len(leaves))]
            extra = len(data.files) - 1 - len(leaves)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise ConfigError(f"checkpoint {path} is unreadable ({type(e).__name__}); {fix}") from None
    if extra:
        raise ConfigError(f"checkpoint {path} does not match this run's state; {fix}")
    for got, want in zip(stored, leaves, strict=True):
        if got.shape != np.shape(want) or got.dtype != jnp.asarray(want).dtype:
            raise ConfigError(f"checkpoint {path} does not match this run's state; {fix}")
    return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in stored]), meta
