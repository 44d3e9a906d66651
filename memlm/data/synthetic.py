"""Synthetic corpora (no files, no tensorflow): random-token documents for benchmarks and tests."""

from __future__ import annotations

import numpy as np


class SyntheticCorpus:
    """`n_docs` documents of random tokens in [3, vocab) with lengths in [min_len, max_len], eos appended.

    Same interface as memlm.data.corpus.Corpus (num_docs, doc(i), total_tokens, name).
    """

    def __init__(self, vocab_size: int, n_docs: int = 64, min_len: int = 64, max_len: int = 1024,
                 seed: int = 0, eos_id: int = 1):
        rng = np.random.default_rng(seed)
        self.lengths = rng.integers(min_len, max_len + 1, size=n_docs)
        self._seed, self._vocab, self._eos = seed, vocab_size, eos_id
        self.name = f"synthetic-v{vocab_size}-n{n_docs}-s{seed}"

    @property
    def num_docs(self) -> int:
        return len(self.lengths)

    @property
    def doc_lengths(self) -> np.ndarray:
        return self.lengths

    @property
    def total_tokens(self) -> int:
        return int(self.lengths.sum())

    def doc(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([self._seed, i])
        toks = rng.integers(3, self._vocab, size=int(self.lengths[i]) - 1, dtype=np.int32)
        return np.concatenate([toks, np.array([self._eos], np.int32)])


class AssociativeRecallCorpus:
    """Multi-query associative recall across segments: pairs in segment 0, queries in the last segment.

    Each document is exactly n_segments * segment_len + 1 tokens (so it fills one batch row):
      segment 0:          k1 v1 k2 v2 ... k_P v_P  then filler
      segments 1 .. S-2:  filler
      segment S-1:        filler ... QUERY k_a v_a k_b v_b ...   (all P pairs again, in a random order)
    Keys and values are drawn without replacement from disjoint id ranges; filler tokens from a third range.
    Only the recalled values count in the loss (`doc_loss_mask`: the targets of the repeated keys), so the
    loss is the recall loss and accuracy = argmax at those positions. A model that cannot carry information
    from segment 0 to segment S-1 is at chance (1 / num_values) on the first recalled value.

    in_window: the fraction of documents (drawn per document, from its own stream) whose pairs are moved into
    segment S-1, at a random offset before the query, i.e. within attention's reach; segment 0 is then filler.
    A training curriculum: a backbone learns the key/value binding first where attention can see both, and the
    memory then carries that binding across segments (BENCHMARKS.md, "Titans"). Evaluation uses 0 (every pair
    beyond the window). The other documents are token-for-token those of in_window = 0.
    """

    QUERY = 3

    def __init__(self, n_docs: int, n_segments: int, segment_len: int, num_pairs: int = 4, num_keys: int = 16,
                 num_values: int = 16, num_filler: int = 32, seed: int = 0, in_window: float = 0.0):
        if 2 * num_pairs + 1 > segment_len or n_segments < 2:
            raise ValueError("AssociativeRecallCorpus: need 2*num_pairs+1 <= segment_len and n_segments >= 2")
        if num_pairs > num_keys:
            raise ValueError(f"AssociativeRecallCorpus: {num_pairs} pairs need distinct keys, there are {num_keys}")
        if not 0.0 <= in_window <= 1.0:
            raise ValueError(f"AssociativeRecallCorpus: in_window={in_window} is not a fraction in [0, 1]")
        if in_window > 0 and 4 * num_pairs + 1 > segment_len:
            raise ValueError(f"AssociativeRecallCorpus: in_window > 0 puts {num_pairs} pairs, the query marker and "
                             f"{num_pairs} queries in one segment: needs 4*num_pairs+1 <= segment_len ({segment_len})")
        self.in_window = in_window
        self.key_base, self.value_base = 4, 4 + num_keys
        self.filler_base = self.value_base + num_values
        self.vocab_needed = self.filler_base + num_filler
        self._args = (n_docs, n_segments, segment_len, num_pairs, num_keys, num_values, num_filler, seed)
        self.length = n_segments * segment_len + 1
        self.name = (f"assoc-recall-n{n_docs}-s{n_segments}x{segment_len}-p{num_pairs}-seed{seed}"
                     + (f"-inwin{in_window:g}" if in_window else ""))
        self.pad_id = 0

    @property
    def num_docs(self) -> int:
        return self._args[0]

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.full(self.num_docs, self.length, np.int64)

    @property
    def total_tokens(self) -> int:
        return self.num_docs * self.length

    def _query_start(self) -> int:
        return self.length - 1 - 2 * self._args[3]  # index of the first repeated key

    def doc(self, i: int) -> np.ndarray:
        n_docs, s, l, p, nk, nv, nf, seed = self._args
        rng = np.random.default_rng([seed, i])
        toks = self.filler_base + rng.integers(0, nf, size=self.length)
        keys = self.key_base + rng.choice(nk, size=p, replace=False)
        values = self.value_base + rng.choice(nv, size=p, replace=False)
        toks[0 : 2 * p : 2], toks[1 : 2 * p : 2] = keys, values
        order = rng.permutation(p)
        q = self._query_start()
        toks[q - 1] = self.QUERY
        toks[q : q + 2 * p : 2], toks[q + 1 : q + 2 * p : 2] = keys[order], values[order]
        if self.in_window:
            move = np.random.default_rng([seed, i, 1])  # its own stream: the other documents stay unchanged
            if move.random() < self.in_window:
                last = (s - 1) * l  # first token of the last segment; the pairs must end before the marker
                start = last + int(move.integers(0, q - 1 - 2 * p - last + 1))
                toks[start : start + 2 * p] = toks[: 2 * p].copy()
                toks[: 2 * p] = self.filler_base + move.integers(0, nf, size=2 * p)
        return toks.astype(np.int32)

    def doc_loss_mask(self, i: int) -> np.ndarray:
        """1 at the targets that are recalled values (the input at those positions is a repeated key)."""
        mask = np.zeros(self.length - 1, np.float32)
        q = self._query_start()
        mask[q : q + 2 * self._args[3] : 2] = 1.0
        return mask
