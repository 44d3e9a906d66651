"""SegmentBatcher / eval_batches against a slow reference (unit), and corpora read through seqio / the
local_pg19 TFDS builder (integration: the only data test module that imports tensorflow)."""

from __future__ import annotations

import argparse
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from memlm.data import corpus as corpus_lib
from memlm.data.batcher import SegmentBatcher, eval_batches
from memlm.data.books import write_books_dir
from memlm.data.cli import add_data_commands
from memlm.data.corpus import Corpus, load_corpus
from memlm.data.tokenizers import ByteTokenizer, train_sentencepiece
from memlm.errors import UserError
from tests.data.textgen import lines_text, write_pg19_tree, write_text_dir

KEYS = ("tokens", "targets", "loss_mask", "reset", "positions")


def toy_corpus(seed: int = 0, n_docs: int = 7, pad_id: int = 0) -> Corpus:
    """Documents of awkward lengths (eos = 1 last): only eos, exactly L+1, L+2, long ones."""
    rng = np.random.default_rng(seed)
    lengths = [1, 5, 6, 7, 2, 23, 40, 3, 13][:n_docs]
    docs = [np.append(rng.integers(3, 50, n - 1), 1) for n in lengths]
    return Corpus.from_docs(docs, name="toy", pad_id=pad_id, eos_id=1)


# ----------------------------------------------------------------------------- reference


def reference_slot_segments(corpus: Corpus, seed: int, slot: int, L: int, count: int, pad: int):
    """The first `count` segments of slot `slot`, built the obvious way (Python loops)."""
    segs = []
    epoch = 0
    while len(segs) < count:
        for d in np.random.default_rng([seed, slot, epoch]).permutation(corpus.num_docs):
            x = [int(t) for t in corpus.doc(int(d))]
            n = len(x) - 1
            for j in range(math.ceil(n / L)):
                seg = {"tokens": [], "targets": [], "loss_mask": [], "positions": [], "reset": j == 0}
                for t in range(L):
                    p = j * L + t
                    real = p < n
                    seg["tokens"].append(x[p] if real else pad)
                    seg["targets"].append(x[p + 1] if real else pad)
                    seg["loss_mask"].append(1.0 if real else 0.0)
                    seg["positions"].append(p)
                segs.append(seg)
        epoch += 1
    return segs[:count]


def reference_batches(corpus, seed, slots, S, L, steps, pad=0):
    per_slot = {s: reference_slot_segments(corpus, seed, s, L, steps * S, pad) for s in slots}
    out = []
    for k in range(steps):
        b = {key: np.array([[per_slot[s][k * S + j][key] for j in range(S)] for s in slots]) for key in KEYS}
        out.append(b)
    return out


def assert_batches_equal(a, b):
    for key in KEYS:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ----------------------------------------------------------------------------- SegmentBatcher (unit)


@pytest.mark.unit
class TestSegmentBatcher:
    @pytest.mark.parametrize("S,L", [(3, 5), (1, 4), (4, 1), (2, 64)])
    def test_matches_reference_across_epochs(self, S, L):
        c = toy_corpus(pad_id=0)
        steps = 12
        bat = SegmentBatcher(c, global_batch=3, n_segments=S, segment_len=L, seed=5)
        got = [bat.next() for _ in range(steps)]
        want = reference_batches(c, 5, [0, 1, 2], S, L, steps)
        for g, w in zip(got, want, strict=True):
            assert g["tokens"].dtype == np.int32 and g["targets"].dtype == np.int32
            assert g["positions"].dtype == np.int32
            assert g["loss_mask"].dtype == np.float32 and g["reset"].dtype == bool
            assert g["tokens"].shape == (3, S, L) and g["reset"].shape == (3, S)
            assert_batches_equal(g, w)

    def test_pads_with_corpus_pad_id(self):
        c = toy_corpus(pad_id=99)
        got = SegmentBatcher(c, 2, 3, 5, seed=1).next()
        want = reference_batches(c, 1, [0, 1], 3, 5, 1, pad=99)[0]
        assert_batches_equal(got, want)
        assert np.all(got["tokens"][got["loss_mask"] == 0] == 99)

    def test_stream_invariants(self):
        """Independent of the reference: next-token structure, doc continuity across steps, epochs."""
        c = toy_corpus()
        S, L = 2, 4
        bat = SegmentBatcher(c, 2, S, L, seed=3)
        batches = [bat.next() for _ in range(40)]
        for b in range(2):
            segs = [(bt["tokens"][b, s], bt["targets"][b, s], bt["loss_mask"][b, s], bt["reset"][b, s],
                     bt["positions"][b, s]) for bt in batches for s in range(S)]
            prev_target_last = None
            for tok, tgt, mask, reset, pos in segs:
                assert reset == (pos[0] == 0)
                np.testing.assert_array_equal(pos, pos[0] + np.arange(L))
                m = mask.astype(bool)
                assert m[0]  # every segment holds at least one real target (no empty segments)
                assert np.all(m[: m.sum()]) and not np.any(m[m.sum():])  # padding only at the end
                np.testing.assert_array_equal(tok[1:][m[1:]], tgt[:-1][m[1:]])  # targets = next inputs
                if not reset:  # the same document continues in the same slot
                    assert tok[0] == prev_target_last
                prev_target_last = tgt[m][-1]
            # One full epoch of slot b = every document with a target exactly once.
            starts = [i for i, sg in enumerate(segs) if sg[3]]
            docs_with_targets = int(np.sum(c.doc_lengths >= 2))
            first_epoch = np.random.default_rng([3, b, 0]).permutation(c.num_docs)
            expected = [int(d) for d in first_epoch if c.doc_lengths[d] >= 2]
            seen = []
            for i in starts[:docs_with_targets]:
                first = segs[i][0][0]
                seen.append(first)
            assert seen == [int(c.doc(d)[0]) for d in expected]

    def test_same_seed_same_batches_other_seed_differs(self):
        c = toy_corpus()
        a = SegmentBatcher(c, 4, 2, 3, seed=11)
        b = SegmentBatcher(c, 4, 2, 3, seed=11)
        d = SegmentBatcher(c, 4, 2, 3, seed=12)
        diff = False
        for _ in range(6):
            x, y, z = a.next(), b.next(), d.next()
            assert_batches_equal(x, y)
            diff |= not np.array_equal(x["tokens"], z["tokens"])
        assert diff

    @pytest.mark.parametrize("k", [0, 1, 5, 17])
    def test_restore_resumes_exactly(self, k):
        c = toy_corpus()
        a = SegmentBatcher(c, 3, 2, 4, seed=2)
        for _ in range(k):
            a.next()
        state = json.loads(json.dumps(a.state()))  # must survive JSON
        b = SegmentBatcher(c, 3, 2, 4, seed=2)
        b.restore(state)
        for _ in range(8):
            assert_batches_equal(a.next(), b.next())

    def test_restore_rejects_other_runs(self):
        c = toy_corpus()
        st = SegmentBatcher(c, 2, 2, 4, seed=2).state()
        with pytest.raises(ValueError, match="seed"):
            SegmentBatcher(c, 2, 2, 4, seed=3).restore(st)
        with pytest.raises(ValueError, match="segment_len"):
            SegmentBatcher(c, 2, 2, 5, seed=2).restore(st)
        with pytest.raises(ValueError, match="slots"):
            SegmentBatcher(c, 4, 2, 4, seed=2, slots=[3]).restore(st)

    def test_host_slot_ranges_compose_the_global_batch(self):
        c = toy_corpus()
        full = SegmentBatcher(c, 8, 2, 3, seed=7)
        lo = SegmentBatcher(c, 8, 2, 3, seed=7, slots=range(0, 4))
        hi = SegmentBatcher(c, 8, 2, 3, seed=7, slots=range(4, 8))
        seen = []
        for step in range(6):
            f, a, b = full.next(), lo.next(), hi.next()
            seen.append(f)
            for key in KEYS:
                np.testing.assert_array_equal(f[key], np.concatenate([a[key], b[key]]), err_msg=key)
            if step == 2:  # the hosts' states merged restore a single-host batcher
                merged = dict(lo.state())
                merged["slots"] = {**lo.state()["slots"], **hi.state()["slots"]}
                other = SegmentBatcher(c, 8, 2, 3, seed=7)
                other.restore(json.loads(json.dumps(merged)))
        for k in range(3, 6):
            assert_batches_equal(seen[k], other.next())

    def test_duck_typed_corpus(self):
        """Only num_docs and doc(i) are required (e.g. memlm.data.synthetic)."""
        c = toy_corpus()

        class Duck:
            num_docs = c.num_docs
            doc = staticmethod(c.doc)

        a, b = SegmentBatcher(c, 2, 2, 3, seed=9), SegmentBatcher(Duck(), 2, 2, 3, seed=9)
        for _ in range(5):
            assert_batches_equal(a.next(), b.next())
        for x, y in zip(eval_batches(c, 2, 2, 3, None), eval_batches(Duck(), 2, 2, 3, None), strict=True):
            assert_batches_equal(x, y)

    def test_bad_arguments(self):
        c = toy_corpus()
        with pytest.raises(ValueError, match="slots"):
            SegmentBatcher(c, 4, 2, 3, seed=0, slots=[4])
        with pytest.raises(ValueError, match="target"):
            SegmentBatcher(Corpus.from_docs([[1], [1]]), 2, 2, 3, seed=0)


@pytest.mark.unit
class TestEvalBatches:
    def reconstruct(self, batches, c):
        """Rebuild documents from eval batches: per slot, segments from a reset to the next."""
        docs = []  # (first batch index, slot, tokens)
        B, S = batches[0]["reset"].shape
        for b in range(B):
            cur = None
            for k, bt in enumerate(batches):
                for s in range(S):
                    m = bt["loss_mask"][b, s].astype(bool)
                    if bt["reset"][b, s]:
                        cur = [k * S + s, b, [int(bt["tokens"][b, s, 0])]]
                        docs.append(cur)
                    if m.any():
                        cur[2].extend(int(t) for t in bt["targets"][b, s][m])
                    else:
                        assert not bt["reset"][b, s] and np.all(bt["positions"][b, s] == 0)
        return docs

    def test_one_pass_covers_every_document_once(self):
        c = toy_corpus()
        batches = eval_batches(c, batch=3, n_segments=2, segment_len=4, num_batches=None)
        docs = self.reconstruct(batches, c)
        want = [list(map(int, c.doc(i))) for i in range(c.num_docs) if c.doc_lengths[i] >= 2]
        assert sorted(d[2] for d in docs) == sorted(want)
        # Taken in corpus order: document starts sorted by (segment index, slot) follow corpus order.
        assert [d[2] for d in sorted(docs, key=lambda d: (d[0], d[1]))] == want
        assert sum(float(b["loss_mask"].sum()) for b in batches) == sum(len(w) - 1 for w in want)
        # The last batch is not all padding (it stops as soon as everything is consumed).
        assert batches[-1]["loss_mask"].sum() > 0

    def test_deterministic_limited_and_seeded(self):
        c = toy_corpus()
        a = eval_batches(c, 2, 2, 3, num_batches=3)
        b = eval_batches(c, 2, 2, 3, num_batches=3)
        assert len(a) == 3
        for x, y in zip(a, b, strict=True):
            assert_batches_equal(x, y)
        s = eval_batches(c, 2, 2, 3, num_batches=None, seed=4)
        docs = self.reconstruct(s, c)
        order = [d[2] for d in sorted(docs, key=lambda d: (d[0], d[1]))]
        perm = np.random.default_rng([4]).permutation(c.num_docs)
        assert order == [list(map(int, c.doc(int(i)))) for i in perm if c.doc_lengths[i] >= 2]


@pytest.mark.unit
def test_corpus_from_docs_and_save_load(tmp_path):
    c = Corpus.from_docs([[5, 6, 1], [7, 1], [1]], name="m", doc_names=["a", "b", "c"], doc_words=[2, 1, 0],
                         pad_id=0, eos_id=1)
    assert (c.num_docs, c.total_tokens, c.total_words) == (3, 6, 3)
    np.testing.assert_array_equal(c.doc_lengths, [3, 2, 1])
    d = c.doc(1)
    assert d.dtype == np.int32 and d.tolist() == [7, 1] and not d.flags.writeable
    with pytest.raises(IndexError):
        c.doc(3)
    c.save(str(tmp_path / "c"))
    c2 = Corpus.load(str(tmp_path / "c"))
    assert (c2.name, c2.doc_names, c2.doc_words.tolist(), c2.pad_id, c2.eos_id) == ("m", ["a", "b", "c"],
                                                                                    [2, 1, 0], 0, 1)
    assert [c2.doc(i).tolist() for i in range(3)] == [[5, 6, 1], [7, 1], [1]]


@pytest.mark.unit
def test_flat_text_split_matches_line_reference(tmp_path):
    texts = write_text_dir(tmp_path, n_docs=2, n_lines=57)
    (tmp_path / "oneline.txt").write_text("x" * 100, encoding="utf-8")  # no newline: all train

    def ref_cut(text, frac):
        starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"] + [len(text)]
        return min(s for s in starts if s >= int(len(text) * frac))

    parts = {s: dict(corpus_lib.read_text_split(str(tmp_path), s)) for s in ("train", "validation", "test")}
    for name, text in texts.items():
        c1, c2 = ref_cut(text, 0.9), ref_cut(text, 0.95)
        assert 0 < c1 < c2 < len(text)
        assert parts["train"][name] == text[:c1]
        assert parts["validation"][name] == text[c1:c2]
        assert parts["test"][name] == text[c2:]
        assert parts["train"][name] + parts["validation"][name] + parts["test"][name] == text
    assert parts["train"]["oneline"] == "x" * 100
    assert "oneline" not in parts["validation"] and "oneline" not in parts["test"]


# ----------------------------------------------------------------------------- corpora via seqio/TFDS


@pytest.fixture(scope="module")
def byte_tok():
    return ByteTokenizer()


def expected_doc(tok, text):
    return tok.encode(text) + [tok.eos_id]


@pytest.mark.integration
class TestLoadCorpus:
    def test_text_dir_flat_splits(self, tmp_path, byte_tok):
        texts = write_text_dir(tmp_path / "t", n_docs=3, n_lines=50)
        total = {name: "" for name in texts}
        for split in ("train", "validation", "test"):
            c = load_corpus("text_dir", str(tmp_path / "t"), split, byte_tok)
            assert c.doc_names == ["doc0", "doc1", "doc2"] and c.name == f"text_dir:t:{split}:bytes"
            for i, name in enumerate(c.doc_names):
                doc = c.doc(i).tolist()
                assert doc[-1] == byte_tok.eos_id
                text = byte_tok.decode(doc)
                assert doc == expected_doc(byte_tok, text)
                assert c.doc_words[i] == len(text.split())
                total[name] += text
        assert total == texts  # train + validation + test tile every file, without overlap

    def test_text_dir_split_dirs_and_sentencepiece(self, tmp_path):
        root = tmp_path / "s"
        (root / "train").mkdir(parents=True)
        (root / "validation").mkdir()
        docs = {f"b{i}": lines_text(40 + i, 30) for i in range(3)}
        for name, text in docs.items():
            (root / "train" / f"{name}.txt").write_text(text, encoding="utf-8")
        (root / "train" / "blank.txt").write_text("  \n\n", encoding="utf-8")  # skipped: no text
        (root / "validation" / "v.txt").write_text("Mary went home.\n", encoding="utf-8")
        from memlm.data.tokenizers import SentencePieceTokenizer

        tok = SentencePieceTokenizer(train_sentencepiece(str(root), str(tmp_path / "spm"), 80))
        c = load_corpus("text_dir", str(root), "train", tok)
        assert c.doc_names == ["b0", "b1", "b2"] and c.pad_id == tok.pad_id and c.eos_id == tok.eos_id
        for i, name in enumerate(c.doc_names):
            assert c.doc(i).tolist() == expected_doc(tok, docs[name])
        assert load_corpus("text_dir", str(root), "validation", tok).num_docs == 1
        with pytest.raises(UserError, match=str(root / "test")):
            load_corpus("text_dir", str(root), "test", tok)

    def test_pg19_through_tfds_builder(self, tmp_path, byte_tok):
        texts = write_pg19_tree(tmp_path / "pg", {"train": [30, 4, 112], "validation": [7], "test": [9, 8]})
        cache = tmp_path / "cache"
        for split, ids in (("train", [4, 30, 112]), ("validation", [7]), ("test", [8, 9])):
            c = load_corpus("pg19", str(tmp_path / "pg"), split, byte_tok, cache_dir=str(cache))
            assert c.doc_names == [str(i) for i in ids]  # ordered by book_id
            for i, book in enumerate(ids):
                assert c.doc(i).tolist() == expected_doc(byte_tok, texts[book])
                assert c.doc_words[i] == len(texts[book].split())
        assert (cache / "tfds").is_dir()  # read through the local_pg19 TFDS builder

    def test_books_dir_loads_as_pg19(self, tmp_path, byte_tok):
        from memlm.data.books import AUSTEN_BOOKS

        texts = {b.book_id: f"{b.title.upper()}\n\nby Jane Austen\n\n" + lines_text(b.book_id, 10)
                 for b in AUSTEN_BOOKS}
        write_books_dir(str(tmp_path / "b"), texts, "# source\n")
        c = load_corpus("pg19", str(tmp_path / "b"), "train", byte_tok)
        assert c.doc_names == ["141", "158", "161", "1342"]
        assert byte_tok.decode(c.doc(3)) == texts[1342]

    def test_cache_hit_and_invalidation(self, tmp_path, byte_tok, monkeypatch):
        from memlm.data import seqio_tasks

        texts = write_text_dir(tmp_path / "t", n_docs=2, n_lines=30)
        cache = str(tmp_path / "cache")
        first = load_corpus("text_dir", str(tmp_path / "t"), "train", byte_tok, cache_dir=cache)
        parent = os.path.join(cache, "corpus")
        (entry,) = os.listdir(parent)  # made by mkdtemp (0700), then given its parent's mode
        assert stat.S_IMODE(os.stat(os.path.join(parent, entry)).st_mode) == stat.S_IMODE(os.stat(parent).st_mode)

        def fail(*a, **k):
            raise AssertionError("cache miss")

        monkeypatch.setattr(seqio_tasks, "iter_documents", fail)
        again = load_corpus("text_dir", str(tmp_path / "t"), "train", byte_tok, cache_dir=cache)
        assert isinstance(again._tokens, np.memmap)
        for i in range(first.num_docs):
            np.testing.assert_array_equal(first.doc(i), again.doc(i))
        assert again.doc_names == first.doc_names and again.doc_words.tolist() == first.doc_words.tolist()
        p = tmp_path / "t" / "doc1.txt"
        p.write_text("More text.\n" + texts["doc1"], encoding="utf-8")
        os.utime(p, ns=(1, 1))
        with pytest.raises(AssertionError, match="cache miss"):
            load_corpus("text_dir", str(tmp_path / "t"), "train", byte_tok, cache_dir=cache)
        monkeypatch.undo()
        fresh = load_corpus("text_dir", str(tmp_path / "t"), "train", byte_tok, cache_dir=cache)
        assert byte_tok.decode(fresh.doc(1)).startswith("More text.\n")
        assert len(os.listdir(os.path.join(cache, "corpus"))) == 2

    def test_errors_are_one_line_user_errors(self, tmp_path, byte_tok):
        def err(source, path, split="train"):
            with pytest.raises(UserError) as e:
                load_corpus(source, str(path), split, byte_tok)
            assert "\n" not in str(e.value)
            return str(e.value)

        assert str(tmp_path / "nope") in err("text_dir", tmp_path / "nope")
        assert str(tmp_path / "nope") in err("pg19", tmp_path / "nope")
        (tmp_path / "pg" / "train").mkdir(parents=True)
        assert "metadata.csv" in err("pg19", tmp_path / "pg")
        (tmp_path / "pg" / "metadata.csv").write_text('1,"A, B",1900,http://x\n2,only three,1900\n')
        assert "metadata.csv: line 2" in err("pg19", tmp_path / "pg")
        (tmp_path / "pg" / "metadata.csv").write_text('1,"A, B",1900,http://x\n')
        assert "no <book_id>.txt" in err("pg19", tmp_path / "pg")
        (tmp_path / "pg" / "train" / "5.txt").write_text("text")
        assert "5.txt" in err("pg19", tmp_path / "pg")  # not in metadata
        (tmp_path / "pg" / "train" / "5.txt").unlink()
        (tmp_path / "pg" / "train" / "1.txt").write_text("")
        assert "no tokens" in err("pg19", tmp_path / "pg")
        (tmp_path / "pg" / "train" / "1.txt").write_bytes(b"ok \xff bad")
        assert "1.txt: not valid UTF-8" in err("pg19", tmp_path / "pg")  # raised inside the TFDS builder
        assert "validation" in err("pg19", tmp_path / "pg", "validation")
        (tmp_path / "empty").mkdir()
        assert "no *.txt" in err("text_dir", tmp_path / "empty")
        (tmp_path / "blank").mkdir()
        (tmp_path / "blank" / "a.txt").write_text("\n  \n")
        assert "no documents" in err("text_dir", tmp_path / "blank")
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "a.txt").write_bytes(b"ok \xff\xfe bad")
        assert "a.txt: not valid UTF-8" in err("text_dir", tmp_path / "bad")
        assert "source" in err("hf", tmp_path / "bad")

    def test_seqio_task_and_vocabulary(self, tmp_path, byte_tok):
        import seqio

        from memlm.data import seqio_tasks

        texts = write_text_dir(tmp_path / "t", n_docs=2, n_lines=20)
        name = seqio_tasks.register_task("text_dir", str(tmp_path / "t"), byte_tok)
        assert name == seqio_tasks.task_name("text_dir", str(tmp_path / "t"), ByteTokenizer())
        assert name != seqio_tasks.task_name("text_dir", str(tmp_path / "u"), byte_tok)
        assert seqio_tasks.register_task("text_dir", str(tmp_path / "t"), byte_tok) == name  # idempotent
        ds = seqio.get_dataset(name, task_feature_lengths={"targets": 64}, dataset_split="validation",
                               shuffle=False, feature_converter=seqio.DecoderFeatureConverter(pack=False))
        first = next(ds.as_numpy_iterator())
        val_text = dict(corpus_lib.read_text_split(str(tmp_path / "t"), "validation"))["doc0"]
        want = expected_doc(byte_tok, val_text)[:64]
        np.testing.assert_array_equal(first["decoder_target_tokens"][: len(want)], want)
        # The Tokenizer-as-Vocabulary and memlm's ByteTokenizer agree with seqio.ByteVocabulary.
        vocab = seqio_tasks.TokenizerVocabulary(byte_tok)
        text = "Emma — naïve café"
        assert list(vocab.encode(text)) == list(seqio.ByteVocabulary().encode(text)) == byte_tok.encode(text)
        assert vocab.encode_tf(text).numpy().tolist() == byte_tok.encode(text)
        assert vocab.decode_tf(np.array(byte_tok.encode(text), np.int32)).numpy().decode() == text
        assert (vocab.eos_id, vocab.pad_id, vocab.vocab_size) == (1, 0, 259)
        assert texts  # fixture written


@pytest.mark.integration
def test_cli_stats(tmp_path, capsys):
    texts = write_pg19_tree(tmp_path / "pg", {"test": [3, 1]})
    parser = argparse.ArgumentParser(prog="memlm")
    add_data_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "stats", "--source", "pg19", "--path", str(tmp_path / "pg"), "--split",
                              "test", "--tokenizer", "bytes"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(":", 1) for line in out.strip().splitlines())
    n_bytes = sum(len(t.encode("utf-8")) for t in texts.values())
    assert lines["docs"].strip() == "2"
    assert lines["tokens"].split()[0] == str(n_bytes + 2)
    assert lines["words"].split()[0] == str(sum(len(t.split()) for t in texts.values()))
    assert Path(tmp_path / "pg").is_dir()


@pytest.mark.integration
def test_tfds_prepare_runs_under_the_directory_lock(tmp_path, monkeypatch):
    """prepare_pg19 makes and prepares its TFDS builder holding seqio_tasks.tfds_prepare_lock: two `memlm train`
    runs started together on fresh books once raced on TFDS's rename of `incomplete.*` and one crashed. Here a
    probe through another open file cannot take the lock while the (stand-in) builder is made and prepares."""
    import fcntl

    from memlm.data import seqio_tasks

    tfds_dir = tmp_path / "tfds"

    def locked() -> bool:
        with open(tfds_dir / seqio_tasks.PREPARE_LOCK, "a") as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(probe, fcntl.LOCK_UN)
            return False

    seen = []

    class StandInBuilder:
        def __init__(self, name, data_dir):
            assert data_dir == str(tfds_dir)
            seen.append(("made", locked()))

        def download_and_prepare(self, download_config):
            seen.append(("prepared", locked()))

    monkeypatch.setattr(seqio_tasks.tfds, "builder", StandInBuilder)
    seqio_tasks.prepare_pg19(str(tmp_path / "pg"), "train", str(tfds_dir))
    assert seen == [("made", True), ("prepared", True)]
    assert not locked()  # released

    # a TFDS directory this process cannot write (a shared, prepared copy) is read without the lock
    def read_only(path, exist_ok=False):
        raise PermissionError(13, "Permission denied", path)

    seen.clear()
    monkeypatch.setattr(seqio_tasks.os, "makedirs", read_only)
    seqio_tasks.prepare_pg19(str(tmp_path / "pg"), "train", str(tfds_dir))
    assert seen == [("made", False), ("prepared", False)]
