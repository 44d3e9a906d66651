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

from memlm.errors import UserError

log = logging.getLogger(__name__)
_HANDLER_SET = False


def _fast_array_handler() -> None:
    """Skip replica-parallel slicing (one XLA compile per slice shape; spike-notes §4). Same bytes on disk."""
    global _HANDLER_SET
    if not _HANDLER_SET:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
        )
        _HANDLER_SET = True


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with the given shardings (a restore target that needs no arrays)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


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

    def restore(self, step: int, abstract_params, abstract_opt_state, abstract_carry):
        """Restore onto the shardings carried by the abstract targets. Mismatch -> UserError."""
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
        """Params only (inference, export)."""
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
