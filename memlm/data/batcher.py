"""Slot-stable, segment-aligned document batching (pure numpy; no tensorflow).

Recurrent-memory training (RMT, Bulatov et al. 2022 §3; HMT; Titans; LM2) carries a memory state per batch
row across steps, so batch row ("slot") i must keep reading the same document from one step to the next,
and memory is reset exactly where a new document begins.

Slot i reads its own endless stream: epoch e of slot i is the permutation of all documents given by
np.random.default_rng([seed, i, e]). A document x (eos included) is split into inputs x[:-1] and
next-token targets x[1:]; it starts at a segment boundary and its last segment is padded (tokens = pad_id,
loss_mask = 0), so every segment belongs to exactly one document. Documents with fewer than 2 tokens have
no targets and are skipped. Slots are independent, so hosts feeding disjoint slot ranges together produce
exactly the global batch one host would (multi-host feeding), and (epoch, index, offset) per slot is the
whole iterator state.

Batch arrays (B = len(slots), S = n_segments, L = segment_len):
  tokens    int32   [B, S, L]  inputs
  targets   int32   [B, S, L]  next tokens (pad_id where padded)
  loss_mask float32 [B, S, L]  1 for real targets
  reset     bool    [B, S]     True where a document starts at this segment (reset the memory first)
  positions int32   [B, S, L]  position of the input token in its document, from 0 (padding continues
                               counting; all-padding eval segments use 0)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["SegmentBatcher", "eval_batches", "empty_batch"]

STATE_VERSION = 1


def empty_batch(batch: int, n_segments: int, segment_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """An all-padding batch (loss_mask 0, no resets)."""
    shape = (batch, n_segments, segment_len)
    return {
        "tokens": np.full(shape, pad_id, dtype=np.int32),
        "targets": np.full(shape, pad_id, dtype=np.int32),
        "loss_mask": np.zeros(shape, dtype=np.float32),
        "reset": np.zeros(shape[:2], dtype=bool),
        "positions": np.zeros(shape, dtype=np.int32),
    }


def _pad_id(corpus) -> int:
    """The corpus's pad id if it records one, else 0 (padding is always masked, any valid id works)."""
    return int(getattr(corpus, "pad_id", 0) or 0)


def _doc_lengths(corpus) -> np.ndarray:
    """int64 [num_docs]: `corpus.doc_lengths` if present, else measured from `corpus.doc(i)`."""
    lengths = getattr(corpus, "doc_lengths", None)
    if lengths is None:
        lengths = [len(corpus.doc(i)) for i in range(corpus.num_docs)]
    return np.asarray(lengths, dtype=np.int64)


def _target_mask(corpus, d: int) -> np.ndarray | None:
    """Optional per-target loss weights of document d ([len(doc) - 1]); e.g. answer-only losses."""
    fn = getattr(corpus, "doc_loss_mask", None)
    return None if fn is None else fn(d)


def _fill_segment(
    out: dict[str, np.ndarray], b: int, s: int, doc: np.ndarray, offset: int, L: int,
    target_mask: np.ndarray | None = None,
) -> None:
    """Write segment [offset, offset+L) of document `doc`'s (input, target) pairs into row b, segment s."""
    n = doc.shape[0] - 1  # number of (input, target) pairs
    m = min(L, n - offset)
    out["tokens"][b, s, :m] = doc[offset : offset + m]
    out["targets"][b, s, :m] = doc[offset + 1 : offset + 1 + m]
    out["loss_mask"][b, s, :m] = 1.0 if target_mask is None else target_mask[offset : offset + m]
    out["reset"][b, s] = offset == 0
    out["positions"][b, s] = np.arange(offset, offset + L, dtype=np.int32)


class SegmentBatcher:
    """Slot-stable segment batches over a Corpus (anything with num_docs and doc(i); doc_lengths and
    pad_id are used when present).

    Args:
      corpus: the documents (each ends with eos).
      global_batch: rows in the global batch; slots index into [0, global_batch).
      n_segments, segment_len: batches are [len(slots), n_segments, segment_len].
      seed: permutation seed.
      slots: the global rows this host produces (default all), in output order.
      pad_id: padding id (default: corpus.pad_id if present, else 0).
    """

    def __init__(
        self,
        corpus,
        global_batch: int,
        n_segments: int,
        segment_len: int,
        seed: int,
        slots: Sequence[int] | None = None,
        pad_id: int | None = None,
    ) -> None:
        if global_batch < 1 or n_segments < 1 or segment_len < 1:
            raise ValueError("SegmentBatcher: global_batch, n_segments and segment_len must be >= 1")
        self.corpus = corpus
        self.global_batch = int(global_batch)
        self.n_segments = int(n_segments)
        self.segment_len = int(segment_len)
        self.seed = int(seed)
        self.slots = list(range(global_batch)) if slots is None else [int(s) for s in slots]
        if any(not 0 <= s < global_batch for s in self.slots) or len(set(self.slots)) != len(self.slots):
            raise ValueError(f"SegmentBatcher: slots must be distinct rows in [0, {global_batch})")
        self.pad_id = _pad_id(corpus) if pad_id is None else int(pad_id)
        self._lengths = _doc_lengths(corpus)
        if self._lengths.size == 0 or not np.any(self._lengths >= 2):
            raise ValueError(f"SegmentBatcher: corpus {getattr(corpus, 'name', '')!r} has no document "
                             "with at least one target token")
        # Per slot: [epoch, index into the epoch's permutation, token offset into the current document].
        self._pos = {s: [0, 0, 0] for s in self.slots}
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def num_docs(self) -> int:
        return int(self._lengths.size)

    def _perm(self, slot: int, epoch: int) -> np.ndarray:
        cached = self._perm_cache.get(slot)
        if cached is None or cached[0] != epoch:
            perm = np.random.default_rng([self.seed, slot, epoch]).permutation(self.num_docs)
            cached = self._perm_cache[slot] = (epoch, perm)
        return cached[1]

    def _current_doc(self, slot: int) -> int:
        """The document under slot's cursor, moving past finished epochs and target-less documents."""
        pos = self._pos[slot]
        while True:
            if pos[1] >= self.num_docs:
                pos[0], pos[1], pos[2] = pos[0] + 1, 0, 0
            d = int(self._perm(slot, pos[0])[pos[1]])
            if self._lengths[d] >= 2:
                return d
            pos[1], pos[2] = pos[1] + 1, 0

    def next(self, n_segments: int | None = None) -> dict[str, np.ndarray]:
        """The next batch (see the module docstring). `n_segments` overrides the count for this batch only
        (variable segment counts for curricula); slots continue their documents either way."""
        L = self.segment_len
        n_seg = self.n_segments if n_segments is None else int(n_segments)
        out = empty_batch(len(self.slots), n_seg, L, self.pad_id)
        for b, slot in enumerate(self.slots):
            pos = self._pos[slot]
            for s in range(n_seg):
                d = self._current_doc(slot)
                doc = self.corpus.doc(d)
                _fill_segment(out, b, s, doc, pos[2], L, _target_mask(self.corpus, d))
                pos[2] += L
                if pos[2] >= doc.shape[0] - 1:  # document finished: next one starts on the next segment
                    pos[1], pos[2] = pos[1] + 1, 0
        return out

    def __next__(self) -> dict[str, np.ndarray]:
        return self.next()

    def __iter__(self):
        return self

    def state(self) -> dict:
        """JSON-serializable position: per slot {epoch, index, offset} plus what it is only valid for."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "segment_len": self.segment_len,
            "num_docs": self.num_docs,
            "slots": {str(s): {"epoch": p[0], "index": p[1], "offset": p[2]} for s, p in self._pos.items()},
        }

    def restore(self, state: dict) -> None:
        """Resume from `state()`. The state may hold more slots than this batcher (e.g. merged from hosts)."""
        if state.get("kind") == "babilong_samples":
            raise ValueError("it is a data.source=babilong position (whole samples), and this run reads a token "
                             "stream; give the run its own run.dir")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"batcher state: unsupported version {state.get('version')!r}")
        for key in ("seed", "segment_len", "num_docs"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"batcher state: {key} {state[key]} differs from this batcher's {getattr(self, key)}"
                )
        missing = [s for s in self.slots if str(s) not in state["slots"]]
        if missing:
            raise ValueError(f"batcher state: no position for slots {missing}")
        for s in self.slots:
            p = state["slots"][str(s)]
            self._pos[s] = [int(p["epoch"]), int(p["index"]), int(p["offset"])]


def eval_batches(
    corpus,
    batch: int,
    n_segments: int,
    segment_len: int,
    num_batches: int | None,
    seed: int = 0,
    pad_id: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """Deterministic evaluation batches: one pass over the documents, each read exactly once.

    Documents are taken in corpus order (seed 0) or in the order np.random.default_rng([seed]) permutes
    them (seed != 0). Each slot streams one document at a time, segment-aligned as in SegmentBatcher; a
    slot that finishes its document takes the next unread one (ties go to the lower slot). Once the
    documents run out, slots produce all-padding segments (loss_mask 0). Returns at most num_batches
    batches (None: until every document is consumed), and stops early when all documents are done.
    """
    pad = _pad_id(corpus) if pad_id is None else int(pad_id)
    lengths = _doc_lengths(corpus)
    order = np.arange(lengths.size) if seed == 0 else np.random.default_rng([seed]).permutation(lengths.size)
    queue = [int(d) for d in order if lengths[d] >= 2]
    L = segment_len
    nxt = 0
    cur: list[int | None] = [None] * batch  # document per slot
    off = [0] * batch
    batches = []
    while num_batches is None or len(batches) < num_batches:
        if nxt >= len(queue) and all(c is None for c in cur):
            break
        out = empty_batch(batch, n_segments, L, pad)
        for s in range(n_segments):
            for b in range(batch):
                if cur[b] is None and nxt < len(queue):
                    cur[b], off[b], nxt = queue[nxt], 0, nxt + 1
                if cur[b] is None:
                    continue
                doc = corpus.doc(cur[b])
                _fill_segment(out, b, s, doc, off[b], L, _target_mask(corpus, cur[b]))
                off[b] += L
                if off[b] >= doc.shape[0] - 1:
                    cur[b] = None
        batches.append(out)
    return batches
