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
