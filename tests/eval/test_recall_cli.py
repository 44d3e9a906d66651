"""`memlm eval recall`: the accuracy bookkeeping against a fake model that knows some answers, the real CLI on a
2-step run of configs/tiny/titans_mac_recall.yaml, and bad input (exit code 2, one line)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from memlm.data.synthetic import AssociativeRecallCorpus
from memlm.eval.recall import recall_accuracy
from tests.core.cli_utils import run_memlm

S, L = 2, 16


class AnswersOnly:
    """Predicts the true next token at the recalled values listed in `known` (0 = first answer), else token 0."""

    def __init__(self, pairs: int, known: tuple[int, ...], split_seed: int = 1):
        self.config = SimpleNamespace(data=SimpleNamespace(n_segments=S, segment_len=L, recall_pairs=pairs))
        self.corpus = AssociativeRecallCorpus(10**6, S, L, num_pairs=pairs, seed=split_seed)
        self.known = known

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        out = np.zeros(tokens.shape + (259,), np.float32)
        out[..., 0] = 1.0
        for row, toks in enumerate(tokens):
            doc = next(d for d in (self.corpus.doc(i) for i in range(10**4)) if np.array_equal(d[:-1], toks))
            answers = np.nonzero(self.corpus.doc_loss_mask(0))[0]  # same positions in every document
            for a in self.known:
                out[row, answers[a], doc[answers[a] + 1]] = 2.0
        return out


def test_accuracy_counts_each_answer_in_query_order():
    r = recall_accuracy(AnswersOnly(3, known=(0, 2)), n_docs=40, batch=16)
    assert r["n_answers"] == 120
    assert r["per_answer"] == [1.0, 0.0, 1.0]
    assert r["first_answer_accuracy"] == 1.0 and r["accuracy"] == pytest.approx(2 / 3)
    r = recall_accuracy(AnswersOnly(2, known=(1,)), n_docs=20, batch=8)
    assert r["per_answer"] == [0.0, 1.0] and r["first_answer_accuracy"] == 0.0 and r["accuracy"] == 0.5


@pytest.mark.integration
def test_cli_eval_recall_on_a_trained_run(tmp_path):
    run = tmp_path / "run"
    r = run_memlm("train", "configs/tiny/titans_mac_recall.yaml", f"run.dir={run}", "train.steps=2",
                  "train.progress=false", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "res" / "recall.json"
    r = run_memlm("eval", "recall", "--run", str(run), "--docs", "32", "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["step"] == 2 and res["model"] == "titans" and res["n_answers"] == 64
    assert len(res["per_answer"]) == 2 and 0.0 <= res["accuracy"] <= 1.0
    assert res["accuracy"] == pytest.approx(np.mean(res["per_answer"]), abs=1e-4)


def test_cli_eval_recall_bad_input_exits_2_with_one_line(tmp_path):
    books = tmp_path / "books_run"
    books.mkdir()
    (books / "config.yaml").write_text("model:\n  kind: baseline\ndata:\n  source: books\n")
    cases = [(["--run", str(books)], "data.source is 'books'"),
             (["--run", str(tmp_path / "missing")], "not a memlm run directory"),
             (["--run", str(books), "--docs", "0"], "--docs")]
    for args, needle in cases:
        r = run_memlm("eval", "recall", *args, timeout=120)
        lines = [x for x in r.stderr.splitlines() if x.startswith("memlm")]
        assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, r.returncode, r.stderr[-1500:])
        assert "Traceback" not in r.stderr
