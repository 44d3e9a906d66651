"""Checkpoints: the only module that imports orbax.

A run directory holds `checkpoints/<step>/{state,carry,data}` written by an async orbax CheckpointManager:
  state: {"params": nnx.State, "opt_state": optax state}
  carry: {"memory": memory carry pytree, "step": int}
  data:  JSON {"step", "data_position": {slot: cursor, ...}}   (the data position of every batch slot)
Restores always target abstract arrays carrying the *current* mesh's shardings, so a checkpoint written on
8 devices restores onto 4 or 1 (architecture.md decision 7).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from memlm.errors import UserError

log = logging.getLogger(__name__)
_HANDLER_SET = False


def _fast_array_handler() -> None:
    """Skip replica-parallel slicing (one XLA compile per slice shape; spike-notes §4). Same bytes on disk."""
    global _HANDLER_SET
    if not _HANDLER_SET:
        absl_log = logging.getLogger("absl")
        level = absl_log.level
        absl_log.setLevel(logging.ERROR)  # orbax warns that it overrides the handler, which is the point
        try:
            ocp.type_handlers.register_type_handler(
                jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
            )
        finally:
            absl_log.setLevel(level)
        _HANDLER_SET = True


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with the given shardings (a restore target that needs no arrays)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def dotted(path) -> str:
    """A tree path as 'decoder.blocks.attn.wk.kernel' (nnx's trailing '.value' dropped)."""
    return jax.tree_util.keystr(path, simple=True, separator=".").removesuffix(".value")


def param_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{dotted path: shape} of every array (or ShapeDtypeStruct / orbax ArrayMetadata) leaf."""
    return {dotted(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def params_mismatch(saved: dict[str, tuple], wanted: dict[str, tuple]) -> str | None:
    """One line saying how a checkpoint's parameters (saved) differ from the model's (wanted), or None."""
    def few(keys):
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    missing = sorted(wanted.keys() - saved.keys())
    extra = sorted(saved.keys() - wanted.keys())
    reshaped = [k for k in sorted(wanted.keys() & saved.keys()) if saved[k] != wanted[k]]
    parts = []
    if missing:
        parts.append(f"{len(missing)} model parameter(s) not in the checkpoint: {few(missing)}")
    if extra:
        parts.append(f"{len(extra)} checkpoint parameter(s) not in the model: {few(extra)}")
    if reshaped:
        k = reshaped[0]
        more = f" (+{len(reshaped) - 1} more)" if len(reshaped) > 1 else ""
        parts.append(f"{k} has shape {saved[k]} in the checkpoint, {wanted[k]} in the model{more}")
    return "; ".join(parts) or None


def check_savable(tree: Any, what: str) -> None:
    """UserError naming the first zero-size array of `tree` (orbax cannot write one), before a run dir is made."""
    empty = [(k, shape) for k, shape in param_shapes(tree).items() if 0 in shape]
    if empty:
        k, shape = empty[0]
        raise UserError(f"{what} {k} has shape {shape}: a zero-size array cannot be checkpointed (a memory of size "
                        "0? set it >= 1, or use model.kind=baseline model.segment_local=true for no memory)")


class Checkpointer:
    """Async save / sharded restore of (train state, memory carry, data position)."""

    def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
        _fast_array_handler()
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
            ),
            item_names=("state", "carry", "data"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, params, opt_state, carry, data_position: dict, force: bool = False) -> bool:
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
                carry=ocp.args.StandardSave({"memory": carry, "step": np.int64(step)}),
                data=ocp.args.JsonSave({"step": int(step), "data_position": data_position}),
            ),
            force=force,
        )

    def check_params(self, step: int, abstract_params, what: str = "the model config") -> None:
        """UserError naming the parameters where checkpoint `step` and the model differ (names and shapes, read
        from the checkpoint's metadata before any array is restored)."""
        try:
            saved = ocp.PyTreeCheckpointHandler().metadata(epath.Path(self.directory) / str(step) / "state")
            saved = param_shapes(saved["params"])
        except (OSError, ValueError, KeyError, TypeError):  # unreadable metadata: the restore reports it
            return
        problem = params_mismatch(saved, param_shapes(abstract_params))
        if problem:
            raise UserError(f"{self.directory}/{step}: checkpoint does not match {what}: {problem}")

    def restore(self, step: int, abstract_params, abstract_opt_state, abstract_carry):
        """Restore onto the shardings carried by the abstract targets. Mismatch -> UserError."""
        self.check_params(step, abstract_params, "the model/optimizer config")
        target_carry = {"memory": abstract_carry, "step": jax.ShapeDtypeStruct((), np.int64)}
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore({"params": abstract_params, "opt_state": abstract_opt_state}),
                    carry=ocp.args.StandardRestore(target_carry),
                    data=ocp.args.JsonRestore(),
                ),
            )
        except (ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"{self.directory}/{step}: checkpoint does not match the model/optimizer config ({first[:300]})"
            ) from None
        return out["state"]["params"], out["state"]["opt_state"], out["carry"]["memory"], out["data"]

    def restore_params(self, step: int, abstract_params):
        """Params only (inference, export, warm start): every parameter of the model, no other."""
        self.check_params(step, abstract_params)
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        {"params": abstract_params},
                        restore_args=jax.tree.map(
                            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), {"params": abstract_params}
                        ),
                        partial_restore=True,
                    )
                ),
            )
        except (ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"{self.directory}/{step}: checkpoint does not match the model config ({first[:300]})"
            ) from None
        return out["state"]["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def save_params_only(path: str, params) -> None:
    """A params-only orbax checkpoint (`memlm export --format params`)."""
    _fast_array_handler()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(path), params)
    ckptr.wait_until_finished()


def load_params_only(path: str, abstract_params):
    _fast_array_handler()
    return ocp.StandardCheckpointer().restore(os.path.abspath(path), abstract_params)
