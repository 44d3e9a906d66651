"""Python API for notebooks and scripts: `memlm.load(run_dir)`.

    lm = memlm.load("runs/tiny")
    ids = lm.tokenizer.encode("It is a truth universally acknowledged")
    logits = lm.logits(np.array([ids]))            # float32 [1, len, vocab]
    out = lm.generate(ids, max_new_tokens=40)        # greedy continuation (token ids)
    print(lm.tokenizer.decode(out))

Memory models run segment by segment with the memory carry, so any context length works and device memory
does not grow with it. Models without memory accept up to `model.max_seq_len` tokens.
"""

from __future__ import annotations

import os
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memlm import config as config_lib
from memlm.checkpoint import Checkpointer
from memlm.errors import DIVERGENCE_HINT, NonFiniteOutput, UserError
from memlm.sharding import make_mesh
from memlm.train import setup as setup_lib


class LoadedModel:
    """A trained model restored from a run dir, on a single-device (or given) mesh."""

    def __init__(self, cfg, params, setup, step: int):
        self.config = cfg
        self.step = step
        self._setup = setup
        self._params = params
        self._model = nnx.merge(setup.graphdef, params)
        self.segment_len = cfg.data.segment_len
        self.vocab_size = cfg.model.vocab_size

    @cached_property
    def tokenizer(self):
        from memlm.data.pipeline import get_tokenizer

        return get_tokenizer(self.config.data)

    @property
    def stateless(self) -> bool:
        return bool(getattr(self._model, "stateless", False)) and not self.config.model.segment_local

    # ---- jitted pieces -----------------------------------------------------------------------------------
    @cached_property
    def _full_fn(self):
        gd = self._setup.graphdef
        return jax.jit(lambda p, t: nnx.merge(gd, p).full_logits(t))

    @cached_property
    def _segment_fn(self):
        gd = self._setup.graphdef
        return jax.jit(lambda p, c, t, pos: nnx.merge(gd, p).segment_logits(c, t, pos))

    @cached_property
    def _host_stream(self):
        """The model's non-jitted `stream_segment(carry, tokens)` hook, or None (the jitted segment_logits)."""
        return getattr(self._model, "host_stream", None)

    def init_carry(self, batch: int):
        gd = self._setup.graphdef
        return jax.jit(lambda p: nnx.merge(gd, p).init_carry(batch))(self._params)

    # ---- public API --------------------------------------------------------------------------------------
    def step_segment(self, carry, tokens: np.ndarray, start_pos: int):
        """One segment through the memory: tokens int32 [batch, n <= segment_len] (padded internally).

        Returns (logits float32 [batch, n, vocab], new carry). The new carry is only meaningful when the
        segment is full (n == segment_len); callers keep partial segments and re-run them.
        """
        b, n = tokens.shape
        pad = self.segment_len - n
        t = np.pad(tokens, ((0, 0), (0, pad)))
        pos = np.broadcast_to(np.arange(start_pos, start_pos + self.segment_len), t.shape)
        if self._host_stream is not None:  # e.g. landmark offload_kv: K/V in host memory, a Python layer loop
            logits, new = self._host_stream(carry, jnp.asarray(t, jnp.int32))
        else:
            logits, new = self._segment_fn(self._params, carry, jnp.asarray(t, jnp.int32),
                                           jnp.asarray(pos, jnp.int32))
        return logits[:, :n, : self.vocab_size], new

    def _token_ids(self, tokens, what: str = "tokens") -> np.ndarray:
        """tokens as an int32 array; UserError for ragged rows, non-integer values or ids outside the vocabulary
        (the padded embedding rows past vocab_size would otherwise answer them silently)."""
        try:
            arr = np.asarray(tokens)
        except ValueError:
            raise UserError(f"{what}: rows of different lengths (pad them to one length)") from None
        if arr.size == 0:
            return arr.astype(np.int32)
        if not np.issubdtype(arr.dtype, np.integer):
            raise UserError(f"{what}: expected integer token ids, got {arr.dtype} (text goes through "
                            "lm.tokenizer.encode first)")
        bad = arr[(arr < 0) | (arr >= self.vocab_size)]
        if bad.size:
            raise UserError(f"{what}: id {int(bad[0])} is outside the vocabulary [0, {self.vocab_size})")
        return arr.astype(np.int32)

    def logits(self, tokens) -> np.ndarray:
        """int32 [batch, seq] -> float32 [batch, seq, vocab]; memory models stream segment by segment."""
        tokens = self._token_ids(tokens)
        if tokens.ndim != 2:
            raise UserError(f"tokens: expected [batch, seq], got shape {tokens.shape}")
        b, t = tokens.shape
        if t == 0:
            return np.zeros((b, 0, self.vocab_size), np.float32)
        if self.stateless:
            if t > self.config.model.max_seq_len:
                raise UserError(f"sequence of {t} tokens is longer than model.max_seq_len="
                                f"{self.config.model.max_seq_len} and this model has no memory")
            return np.asarray(self._full_fn(self._params, jnp.asarray(tokens))[..., : self.vocab_size])
        carry = self.init_carry(b)
        out = []
        for start in range(0, t, self.segment_len):
            logits, carry = self.step_segment(carry, tokens[:, start : start + self.segment_len], start)
            out.append(np.asarray(logits))
        return np.concatenate(out, axis=1)

    def token_nll(self, tokens) -> np.ndarray:
        """Per-token negative log-likelihood of tokens[:, 1:] given the prefix: float32 [batch, seq-1]."""
        tokens = self._token_ids(tokens)
        if tokens.ndim != 2:
            raise UserError(f"tokens: expected [batch, seq], got shape {tokens.shape}")
        if tokens.shape[1] < 2:
            return np.zeros((tokens.shape[0], 0), np.float32)
        logp = jax.nn.log_softmax(jnp.asarray(self.logits(tokens[:, :-1])), axis=-1)
        return -np.asarray(jnp.take_along_axis(logp, jnp.asarray(tokens[:, 1:, None]), axis=-1)[..., 0])

    def generate(self, prompt_tokens, max_new_tokens: int, eos_id: int | None = None) -> list[int]:
        """Greedy decoding after any length of prompt. Returns only the new tokens.

        Memory models: full segments of the prompt pass through the memory once; the open segment is
        re-run per new token (cost O(segment_len) per token, memory constant in the context length).
        """
        ids = [int(x) for x in self._token_ids(prompt_tokens, "prompt_tokens").reshape(-1)]
        if not ids:
            raise UserError("generate: the prompt is empty")
        eos = self.tokenizer.eos_id if eos_id is None else eos_id
        new: list[int] = []
        if self.stateless:
            for _ in range(max_new_tokens):
                window = ids[-self.config.model.max_seq_len :]
                logits = self._full_fn(self._params, jnp.asarray([window], jnp.int32))
                nxt = _greedy(logits[0, -1, : self.vocab_size], len(ids))
                ids.append(nxt)
                new.append(nxt)
                if nxt == eos:
                    break
            return new
        L = self.segment_len
        carry = self.init_carry(1)
        n_full = (len(ids) - 1) // L  # keep at least one token in the open segment
        for s in range(n_full):
            _, carry = self.step_segment(carry, np.asarray([ids[s * L : (s + 1) * L]]), s * L)
        seg_start = n_full * L
        for _ in range(max_new_tokens):
            open_seg = ids[seg_start:]
            logits, _ = self.step_segment(carry, np.asarray([open_seg]), seg_start)
            nxt = _greedy(logits[0, len(open_seg) - 1], len(ids))
            ids.append(nxt)
            new.append(nxt)
            if nxt == eos:
                break
            if len(ids) - seg_start > L:  # the open segment is full: commit it to memory
                _, carry = self.step_segment(carry, np.asarray([ids[seg_start : seg_start + L]]), seg_start)
                seg_start += L
        return new


def _greedy(logits, position: int) -> int:
    """argmax of one position's logits [vocab]; NonFiniteOutput if any is NaN/inf (argmax would pick garbage)."""
    row = np.asarray(logits)
    if not np.isfinite(row).all():
        raise NonFiniteOutput(f"generate: the model's logits for token {position} are not finite ({DIVERGENCE_HINT})")
    return int(row.argmax())


def load(run_dir: str, step: int | None = None, devices=None) -> LoadedModel:
    """Restore the params of `run_dir` (latest checkpoint, or `step`) for inference."""
    cfg = config_lib.read_run_config(run_dir)
    devices = devices or jax.local_devices()[:1]
    mesh = make_mesh(len(devices), 1, 1, devices)
    setup = setup_lib.build_setup(cfg, mesh, batch_size=1)
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), async_save=False, create=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise UserError(f"{run_dir}: no checkpoint found")
        if step not in ckpt.all_steps():
            raise UserError(f"{run_dir}: no checkpoint at step {step} (have {ckpt.all_steps()})")
        params = ckpt.restore_params(step, setup.abstract_params)
    finally:
        ckpt.close()
    return LoadedModel(cfg, params, setup, step)
