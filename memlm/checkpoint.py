"""Checkpoints: the only module that imports orbax.

A run directory holds `checkpoints/<step>/{state,carry,data}` written by an async orbax CheckpointManager:
  state: {"params": nnx.State, "opt_state": optax state}
  carry: {"memory": memory carry pytree, "step": int}
  data:  JSON {"step", "data_position": {slot: cursor, ...}}   (the data position of every batch slot)
Restores always target abstract arrays carrying the *current* mesh's shardings, so a checkpoint written on
8 devices restores onto 4 or 1 (architecture.md decision 7).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from memlm import errors
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


@contextlib.contextmanager
def _native_stderr_held():
    """Hold what is written to file descriptor 2 during a restore and pass it on if the restore succeeds. When
    one fails (damaged array data), tensorstore's reader threads call into orbax's closed event loop and print
    dozens of 'RuntimeError: Event loop is closed' tracebacks from native code; the one-line error replaces them.
    Those threads outlive the failure, so in the `memlm` command (errors.AS_COMMAND) descriptor 2 stays silenced
    and the CLI writes its error line to the original one (errors.COMMAND_STDERR_FD)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            sys.stderr.flush()
            if ok or not errors.AS_COMMAND:
                os.dup2(saved, 2)
                os.close(saved)
            else:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 2)
                os.close(devnull)
                if errors.COMMAND_STDERR_FD is None:
                    errors.COMMAND_STDERR_FD = saved
                else:
                    os.close(saved)
            if ok:
                held.seek(0)
                text = held.read()
                if text:
                    os.write(2, text)


class Checkpointer:
    """Async save / sharded restore of (train state, memory carry, data position)."""

    def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True, create: bool = True):
        """create=False: only read (a missing directory has no steps and is not made)."""
        _fast_array_handler()
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=create
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
            with _native_stderr_held():
                saved = ocp.PyTreeCheckpointHandler().metadata(epath.Path(self.directory) / str(step) / "state")
            saved = param_shapes(saved["params"])
        except Exception as e:  # unreadable metadata: the restore could not read the arrays either
            raise self._restore_error(step, e, what) from None
        problem = params_mismatch(saved, param_shapes(abstract_params))
        if problem:
            raise UserError(f"{self.directory}/{step}: checkpoint does not match {what}: {problem}")

    def _restore_error(self, step: int, e: Exception, what: str) -> UserError:
        """The one-line error for a failed restore. Names and shapes were compared first (check_params), so an
        error from the storage layer (tensorstore's 'OUT_OF_RANGE: ...', orbax's bare Exception for truncated or
        missing array data) means damaged files; other ValueError / KeyError / TypeError mean a mismatch (the
        optimizer state's structure, dtypes). The manager is closed: nothing more is read from this run dir."""
        earlier = [s for s in self.all_steps() if s < step]
        self.close()
        first = _first_line(e)
        if isinstance(e, (ValueError, KeyError, TypeError)) and not re.match(r"[A-Z_]{5,}: ", first):
            return UserError(f"{self.directory}/{step}: checkpoint does not match {what} ({first})")
        # nothing is deleted for the user: naming the earlier checkpoints says how to go back to one
        hint = (f"; move {self.directory}/{step} out of the run dir to use the earlier checkpoint {max(earlier)}"
                if earlier else "")
        return UserError(f"{self.directory}/{step}: cannot read the checkpoint, damaged or incomplete ({first}){hint}")

    def restore(self, step: int, abstract_params, abstract_opt_state, abstract_carry):
        """Restore onto the shardings carried by the abstract targets. Mismatch -> UserError."""
        self.check_params(step, abstract_params, "the model/optimizer config")
        target_carry = {"memory": abstract_carry, "step": jax.ShapeDtypeStruct((), np.int64)}
        try:
            with _native_stderr_held():
                out = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore({"params": abstract_params, "opt_state": abstract_opt_state}),
                        carry=ocp.args.StandardRestore(target_carry),
                        data=ocp.args.JsonRestore(),
                    ),
                )
        except Exception as e:
            raise self._restore_error(step, e, "the model/optimizer config") from None
        return out["state"]["params"], out["state"]["opt_state"], out["carry"]["memory"], out["data"]

    def restore_params(self, step: int, abstract_params):
        """Params only (inference, export, warm start): every parameter of the model, no other."""
        self.check_params(step, abstract_params)
        try:
            with _native_stderr_held():
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
        except Exception as e:
            raise self._restore_error(step, e, "the model config") from None
        return out["state"]["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _first_line(e: BaseException) -> str:
    """The error's first line, without orbax's pointer to a TensorStore repr (a bound-method fragment), at most
    300 characters."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    line = line.split(" See full TensorStore details:")[0].rstrip()
    return line if len(line) <= 300 else line[:297] + "..."


def save_params_only(path: str, params) -> None:
    """A params-only orbax checkpoint (`memlm export --format params`)."""
    _fast_array_handler()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(path), params)
    ckptr.wait_until_finished()


def load_params_only(path: str, abstract_params):
    _fast_array_handler()
    return ocp.StandardCheckpointer().restore(os.path.abspath(path), abstract_params)
