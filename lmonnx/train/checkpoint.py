"""``checkpoint-N.npz``: the model's and the optimizer's variables after epoch N, keyed by
what each variable is, so that restoring never depends on the order Keras lists them in.

Keys: ``model/<path below the model>`` (``model/lstm_stack/stacked_cells/lstm_1/kernel``),
``model/<layer>/seed_generator_state`` (a cell's or a dropout layer's seed, named by
``model.seeded_layers``), ``optimizer/<name>``
(``optimizer/iteration``, ``optimizer/lstm_stack_stacked_cells_lstm_1_kernel_momentum``) and
``epoch``.  Keras numbers the objects of a process (``language_model_3``, ``adam_2``,
``seed_generator_5``), so those prefixes are replaced by what they stand for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmonnx.atomic import atomic_path
from lmonnx.errors import RunDirError

__all__ = ["save_checkpoint", "load_checkpoint", "variable_keys"]


def _below(path: str, owner: str) -> str:
    return path[len(owner) + 1:] if path.startswith(owner + "/") else path


def variable_keys(model, optimizer) -> dict[str, object]:
    """{key: variable} of every model and optimizer variable (weights, dropout seed states,
    the step count, the learning rate and the Adam moments)."""
    seeds = {id(layer.seed_generator.state): f"{name}/seed_generator_state"
             for name, layer in model.seeded_layers()}
    keys: dict[str, object] = {}
    for v in model.variables:
        keys["model/" + seeds.get(id(v), _below(v.path, model.name))] = v
    for v in optimizer.variables:
        name = _below(v.path, optimizer.name)
        keys["optimizer/" + name.removeprefix(model.name + "_")] = v
    if len(keys) != len(model.variables) + len(optimizer.variables):
        raise AssertionError("two variables share a checkpoint key")  # a bug, not a user error
    return keys


def save_checkpoint(path: Path, model, optimizer, epoch: int) -> None:
    """Every variable of ``model`` and ``optimizer`` under its key, and the epoch, as one
    ``.npz``, atomically."""
    arrays = {key: v.numpy() for key, v in variable_keys(model, optimizer).items()}
    arrays["epoch"] = np.asarray(epoch)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def load_checkpoint(path: Path, model, optimizer) -> int:
    """Restore every variable from ``path`` by key; returns the checkpoint's epoch.
    ``RunDirError`` naming the file when a key is missing, extra or of another shape."""
    optimizer.build(model.trainable_variables)  # create the Adam slots to restore into
    wanted = variable_keys(model, optimizer)
    with np.load(path) as data:
        stored = set(data.files) - {"epoch"}
        missing, extra = sorted(set(wanted) - stored), sorted(stored - set(wanted))
        if missing or extra or "epoch" not in data.files:
            what = (f"lacks {missing[0]}" if missing else f"holds {extra[0]}, which this model "
                    "does not have" if extra else "lacks its epoch")
            raise RunDirError(f"{path} {what}; the checkpoint does not fit this run: start over "
                              "with --force")
        for key, var in wanted.items():
            value = data[key]
            if tuple(value.shape) != tuple(var.shape):
                raise RunDirError(f"{path}: {key} has shape {value.shape}, the model needs "
                                  f"{tuple(var.shape)}; the checkpoint does not fit this run")
            var.assign(value)
        return int(data["epoch"])
