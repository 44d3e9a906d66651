"""memlm parameters <-> flat `name -> array` dicts (the names of `memlm export --format safetensors`).

A parameter at state path ("decoder", "blocks", "attn", "wq", "kernel") is named by joining the path with
dots. Parameters stacked on a leading "layers" axis (the scanned blocks) are *unstacked*: layer i of
decoder.blocks.attn.wq.kernel [n_layers, d, h*hd] is `decoder.blocks.{i}.attn.wq.kernel` [d, h*hd], so a file
reads like any per-layer checkpoint and tools that slice layers need no knowledge of the scan. The index goes
right after the first path component ending in "blocks" (a stacked module elsewhere gets it appended).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx

from memlm.errors import UserError


@dataclass(frozen=True)
class Entry:
    path: tuple[str, ...]
    shape: tuple[int, ...]  # full (stacked) shape
    dtype: np.dtype
    stacked: bool

    @property
    def name(self) -> str:
        return ".".join(self.path)

    def names(self) -> list[str]:
        """The flat names of this parameter (one per layer when stacked)."""
        if not self.stacked:
            return [self.name]
        return [layer_name(self.path, i) for i in range(self.shape[0])]


def layer_name(path: tuple[str, ...], i: int) -> str:
    for k, part in enumerate(path[:-1]):
        if part.endswith("blocks"):
            return ".".join(path[: k + 1] + (str(i),) + path[k + 1 :])
    return ".".join(path + (str(i),))


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _path(keys) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys)


def layout(abstract_params) -> list[Entry]:
    """Every parameter of an (abstract or real) nnx State, in state order."""
    out = []
    for keys, var in jax.tree_util.tree_flatten_with_path(abstract_params, is_leaf=_is_var)[0]:
        names = (var.get_metadata().get("out_sharding") or ()) if _is_var(var) else ()
        value = var.get_value() if _is_var(var) else var
        stacked = bool(names) and names[0] == "layers" and len(value.shape) >= 1
        out.append(Entry(_path(keys), tuple(value.shape), np.dtype(value.dtype), stacked))
    return out


def to_flat(params, dtype=None, only: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """Real params (an nnx State) -> {flat name: numpy array}, optionally cast to `dtype`; `only`: just these
    parameter paths (dotted, unstacked ones), without copying the others to the host."""
    flat: dict[str, np.ndarray] = {}
    for keys, var in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_var)[0]:
        if only is not None and ".".join(_path(keys)) not in only:
            continue
        entry = layout({"x": var})[0]
        arr = np.asarray(jax.device_get(var.get_value() if _is_var(var) else var))
        if dtype is not None:
            arr = arr.astype(dtype)
        path = _path(keys)
        if entry.stacked:
            for i in range(arr.shape[0]):
                flat[layer_name(path, i)] = arr[i]
        else:
            flat[".".join(path)] = arr
    return flat


def from_flat(flat: dict[str, np.ndarray], abstract_params, source: str, strict: bool = True,
              only: Callable[[tuple[str, ...]], bool] | None = None):
    """{flat name: array} -> an nnx State shaped like `abstract_params`, placed with its shardings.

    Arrays are cast to the parameter dtype. Missing tensors, wrong shapes and (strict) unknown names raise a
    one-line UserError naming the tensor. `only(path) -> bool` restricts which parameters are read; the rest
    keep the values of `abstract_params` (which must then be real arrays).
    """
    used: set[str] = set()

    def load(keys, var):
        path = _path(keys)
        if only is not None and not only(path):
            return var
        entry = layout({"x": var})[0]
        entry = Entry(path, entry.shape, entry.dtype, entry.stacked)
        parts = []
        want = entry.shape[1:] if entry.stacked else entry.shape
        for name in entry.names():
            if name not in flat:
                raise UserError(f"{source}: missing tensor {name}")
            arr = flat[name]
            if tuple(arr.shape) != tuple(want):
                raise UserError(f"{source}: tensor {name} has shape {list(arr.shape)} but the model config "
                                f"needs {list(want)}")
            used.add(name)
            parts.append(np.asarray(arr, dtype=entry.dtype))
        value = np.stack(parts) if entry.stacked else parts[0]
        sharding = getattr(var.get_value(), "sharding", None)
        return var.replace(jax.device_put(value, sharding) if sharding is not None else value)

    out = jax.tree_util.tree_map_with_path(load, abstract_params, is_leaf=_is_var)
    extra = sorted(set(flat) - used)
    if strict and extra:
        raise UserError(f"{source}: unexpected tensor {extra[0]} (not a parameter of this model config"
                        f"{f'; {len(extra) - 1} more' if len(extra) > 1 else ''})")
    return out
