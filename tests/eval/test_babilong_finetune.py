"""BABILong fine-tuning documents: answer-only loss masks, whole-sample batches, curriculum stages."""

from __future__ import annotations

import os

import numpy as np
import pytest

from memlm.data.batcher import SegmentBatcher
from memlm.data.tokenizers import ByteTokenizer
from memlm.errors import UserError
from memlm.eval.babilong_finetune import (
    BabilongTrainCorpus,
    SampleBatcher,
    build_train_corpus,
    curriculum,
    encode_sample,
)
from memlm.eval.prompts import PromptConfig
from tests.data.textgen import write_pg19_tree

pytestmark = pytest.mark.unit

TOK = ByteTokenizer()
REC = {"input": "Mary went to the office. John moved to the garden.", "question": "Where is Mary? ",
       "target": "office"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pg")
    write_pg19_tree(root, {"train": [1, 2], "test": [3]}, n_lines=60)
    return build_train_corpus(["qa1", "qa4"], ["0k", "1k"], 3, str(root), TOK, seed=1)


def test_encode_sample_masks_exactly_the_answer():
    tokens, mask = encode_sample(REC, TOK)
    prompt = PromptConfig(finetuned=True).format("qa1", REC["input"], REC["question"])
    assert TOK.decode(tokens) == prompt + "office"  # decode drops the eos
    assert tokens[-1] == TOK.eos_id and mask.shape == (tokens.size - 1,)
    answer_targets = tokens[1:][mask == 1]
    assert bytes(int(t) - 3 for t in answer_targets[:-1]).decode() == "office" and answer_targets[-1] == TOK.eos_id
    assert mask.sum() == len("office") + 1 and np.all(mask[: len(prompt.encode()) - 1] == 0)


def test_corpus_and_batches(corpus):
    assert corpus.num_docs == 12 and sorted(set(corpus.doc_length_name)) == ["0k", "1k"]
    L = 128
    stages = curriculum(corpus, L, steps_per_stage=10)
    assert [s["lengths"] for s in stages] == [["0k"], ["0k", "1k"]]
    assert stages[0]["n_segments"] < stages[1]["n_segments"] and stages[1]["start_step"] == 10
    for st in stages:
        sub = corpus.subset(st["lengths"])
        assert int(sub.doc_lengths.max()) - 1 <= st["n_segments"] * L
        b = SampleBatcher(sub, 4, st["n_segments"], L, seed=0)
        seen: list[list[int]] = [[] for _ in range(4)]
        for _ in range(sub.num_docs):  # one epoch per row
            batch = b.next()
            assert batch["tokens"].shape == (4, st["n_segments"], L)
            assert batch["reset"][:, 0].all() and not batch["reset"][:, 1:].any()
            for r in range(4):
                tok = batch["tokens"][r].reshape(-1)
                tgt = batch["targets"][r].reshape(-1)
                m = batch["loss_mask"][r].reshape(-1)
                doc = [i for i in range(sub.num_docs)
                       if np.array_equal(sub.doc(i)[:-1], tok[: sub.doc(i).size - 1])]
                assert len(doc) == 1
                d = sub.doc(doc[0])
                seen[r].append(doc[0])
                assert np.array_equal(tgt[: d.size - 1], d[1:]) and not m[d.size - 1 :].any()
                np.testing.assert_array_equal(m[: d.size - 1], sub.doc_loss_mask(doc[0]))
                assert TOK.decode(tgt[m == 1]) in ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
                assert tgt[m == 1][-1] == TOK.eos_id
        assert all(sorted(x) == list(range(sub.num_docs)) for x in seen)  # every document once per epoch
        assert len({tuple(x) for x in seen}) > 1  # rows read different orders
        # exact resume
        state = b.state()
        nxt = b.next()
        b2 = SampleBatcher(sub, 4, st["n_segments"], L, seed=0)
        b2.restore(state)
        again = b2.next()
        assert all(np.array_equal(nxt[k], again[k]) for k in nxt)
        # a position of the other data kind is named as such (a run dir reused across data.source)
        stream = SegmentBatcher(sub, 4, 2, L, seed=0)
        with pytest.raises(ValueError, match="it is a data.source=babilong position"):
            stream.restore(state)
        with pytest.raises(ValueError, match="it is not a data.source=babilong position"):
            b2.restore(stream.state())
    with pytest.raises(UserError, match="data.n_segments"):
        SampleBatcher(corpus, 2, stages[0]["n_segments"], L, seed=0)


def test_empty_corpus_is_a_user_error():
    with pytest.raises(UserError, match="no samples"):
        BabilongTrainCorpus([], TOK)


def test_the_training_cache_never_serves_other_samples(tmp_path):
    """data.source=babilong caches generated cells under data.path; a changed seed or samples_per_cell
    generates anew (the cache used to be keyed by task and length only), the same config reuses its cells."""
    from memlm.config import from_dict
    from memlm.data.pipeline import get_corpus

    write_pg19_tree(tmp_path, {"train": [1, 2], "validation": [3], "test": [4]}, n_lines=60)

    def corpus(**babilong):
        cfg = from_dict({"data": {"source": "babilong", "path": str(tmp_path),
                                  "babilong": {"tasks": ["qa1"], "lengths": ["0k"], **babilong}}})
        return get_corpus(cfg, "train", TOK)

    first = corpus(samples_per_cell=2, seed=1)
    assert first.num_docs == 2
    assert corpus(samples_per_cell=3, seed=1).num_docs == 3
    other_seed = corpus(samples_per_cell=2, seed=2)
    assert [other_seed.doc(i).tolist() for i in range(2)] != [first.doc(i).tolist() for i in range(2)]
    again = corpus(samples_per_cell=2, seed=1)
    assert [again.doc(i).tolist() for i in range(2)] == [first.doc(i).tolist() for i in range(2)]
    assert len(os.listdir(tmp_path / ".memlm_cache")) == 3  # one directory per distinct generation
