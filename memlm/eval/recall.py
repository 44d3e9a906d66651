"""Answer accuracy on the associative-recall task (memlm.data.synthetic.AssociativeRecallCorpus)."""

from __future__ import annotations

import numpy as np


def recall_accuracy(lm, n_docs: int = 256, split_seed: int = 1, batch: int = 32) -> dict:
    """Greedy answer accuracy of a loaded model (memlm.load) on held-out recall documents.

    Uses the run's own data settings (segments, pairs); documents come from `split_seed` (training uses 0), all
    with the pairs beyond the attention window (data.recall_in_window only shapes training).
    Returns {"accuracy", "first_answer_accuracy", "per_answer" (accuracy of the 1st, 2nd, ... recalled value:
    a model that stores the set of values but not their keys gets 1/P on the first), "n_answers", "chance"}.
    """
    from memlm.data.synthetic import AssociativeRecallCorpus

    d = lm.config.data
    corpus = AssociativeRecallCorpus(n_docs, d.n_segments, d.segment_len, num_pairs=d.recall_pairs, seed=split_seed)
    hits = np.zeros(d.recall_pairs)  # correct answers so far, per query position
    for start in range(0, n_docs, batch):
        ids = range(start, min(start + batch, n_docs))
        docs = np.stack([corpus.doc(i) for i in ids])
        masks = np.stack([corpus.doc_loss_mask(i) for i in ids]) > 0
        pred = lm.logits(docs[:, :-1]).argmax(-1)
        hits += (pred == docs[:, 1:])[masks].reshape(len(ids), -1).sum(0)  # row-major: each document's answers in order
    per_answer = hits / n_docs
    return {"accuracy": float(hits.sum()) / (n_docs * d.recall_pairs), "first_answer_accuracy": float(per_answer[0]),
            "per_answer": [round(float(x), 4) for x in per_answer], "n_answers": n_docs * d.recall_pairs,
            "chance": 1.0 / 16}
