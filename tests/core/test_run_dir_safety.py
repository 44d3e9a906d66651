"""What a command may overwrite: nothing the user did not name for it. Existing result files, a run's history
without its checkpoints, books and tokenizers already on disk are refused in one line (exit 2) and left as
they were; malformed run files (metrics.jsonl, data_state) are named instead of raising a traceback."""

import json
import os
import shutil

import pytest

from memlm.data.books import AUSTEN_BOOKS, write_books_dir
from memlm.errors import UserError
from tests.core.cli_utils import run_memlm, snapshot
from tests.core.test_bad_input import BASE, _check_error

pytestmark = pytest.mark.integration

SYNTH = [*BASE, "data.source=synthetic", "train.checkpoint_every=1", "train.log_every=1"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-step synthetic run with checkpoints 1 and 2 (copied per test before it is damaged)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    r = run_memlm("train", *SYNTH, f"run.dir={run_dir}")
    assert r.returncode == 0, r.stderr[-2000:]
    return run_dir


def _copy(run_dir, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def test_result_files_are_not_overwritten_without_force(trained_run, tmp_path):
    before = (trained_run / "config.yaml").read_text()
    r = run_memlm("eval", "lm", "--run", str(trained_run), "--max-batches", "1", "--out",
                  str(trained_run / "config.yaml"))
    _check_error(r, "--out", "config.yaml", "already exists", "--force")
    assert (trained_run / "config.yaml").read_text() == before
    r = run_memlm("eval", "lm", "--run", str(trained_run), "--max-batches", "1", "--out", str(tmp_path))
    _check_error(r, "--out", "is a directory")
    mine = tmp_path / "result.json"
    mine.write_text("mine")
    r = run_memlm("eval", "recall", "--run", str(trained_run), "--out", str(mine))
    _check_error(r, "--out", "already exists")
    r = run_memlm("eval", "recall", "--run", str(trained_run), "--seed", "-1")
    _check_error(r, "--seed", "-1")
    r = run_memlm("eval", "pg19", "--run", str(trained_run), "--data", str(tmp_path), "--out", str(mine))
    _check_error(r, "--out", "is a file")
    assert mine.read_text() == "mine"
    r = run_memlm("eval", "lm", "--run", str(trained_run), "--max-batches", "1", "--out", str(mine), "--force")
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"token_nll"' in mine.read_text()


def test_train_tokenizer_keeps_an_existing_model(tmp_path):
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    model = tmp_path / "tok.model"
    model.write_bytes(b"someone's tokenizer")
    r = run_memlm("data", "train-tokenizer", "--input", str(tmp_path / "text.txt"), "--out", str(tmp_path / "tok"),
                  "--vocab-size", "40")
    _check_error(r, "--out", "tok.model", "already exists")
    assert model.read_bytes() == b"someone's tokenizer"


def test_books_dir_keeps_files_it_did_not_write(tmp_path):
    texts = {b.book_id: f"text of {b.title}\n" for b in AUSTEN_BOOKS}
    (tmp_path / "train").mkdir()
    (tmp_path / "metadata.csv").write_text("99999,Mine,1900,x\n")
    (tmp_path / "train" / "99999.txt").write_text("mine\n")
    with pytest.raises(UserError, match="metadata.csv: already exists with other content"):
        write_books_dir(str(tmp_path), texts, "source\n")
    assert (tmp_path / "metadata.csv").read_text() == "99999,Mine,1900,x\n"
    assert sorted(os.listdir(tmp_path / "train")) == ["99999.txt"]  # nothing written before the refusal
    os.remove(tmp_path / "metadata.csv")
    write_books_dir(str(tmp_path), texts, "source\n")
    write_books_dir(str(tmp_path), texts, "source\n")  # the same content again (an interrupted fetch redone)
    edited = tmp_path / AUSTEN_BOOKS[0].split / f"{AUSTEN_BOOKS[0].book_id}.txt"
    edited.write_text("edited\n")
    with pytest.raises(UserError, match=f"{AUSTEN_BOOKS[0].book_id}.txt: already exists with other content"):
        write_books_dir(str(tmp_path), texts, "source\n")
    assert edited.read_text() == "edited\n" and (tmp_path / "train" / "99999.txt").read_text() == "mine\n"


def test_a_history_without_checkpoints_is_not_started_over(trained_run, tmp_path):
    run_dir = _copy(trained_run, tmp_path)
    shutil.rmtree(run_dir / "checkpoints")
    before = snapshot(str(run_dir))
    r = run_memlm("train", *SYNTH, f"run.dir={run_dir}", "train.steps=3")
    _check_error(r, str(run_dir), "data_state/", "checkpoints/ has none")
    assert snapshot(str(run_dir)) == before
    (run_dir / "checkpoints").write_text("x")
    r = run_memlm("train", *SYNTH, f"run.dir={run_dir}")
    _check_error(r, "checkpoints: is a file")
    os.remove(run_dir / "checkpoints")
    shutil.rmtree(run_dir / "data_state")
    os.remove(run_dir / "config.yaml")  # the user's own metrics.jsonl in a directory memlm did not make
    before = snapshot(str(run_dir))
    r = run_memlm("train", *SYNTH, f"run.dir={run_dir}")
    _check_error(r, "metrics.jsonl logs steps up to 2", "no config.yaml")
    assert snapshot(str(run_dir)) == before
    r = run_memlm("train", *SYNTH, f"run.dir={run_dir / 'metrics.jsonl'}")
    _check_error(r, "run.dir", "is a file")


def test_a_run_killed_before_its_first_checkpoint_starts_over(trained_run, tmp_path):
    """The one case a history without a checkpoint may be replaced: the same model's run, cut before it saved."""
    run_dir = _copy(trained_run, tmp_path)
    shutil.rmtree(run_dir / "checkpoints")
    shutil.rmtree(run_dir / "data_state")
    r = run_memlm("train", *SYNTH, f"run.dir={run_dir}", "model.d_model=64")
    _check_error(r, "metrics.jsonl was logged with model.d_model=32")
    r = run_memlm("train", *SYNTH, f"run.dir={run_dir}")
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("damage,needle", [
    ('"hello"\n', "line 3 is not a metrics record"),
    ('{"step": 1, "loss": 3.0}\nnot json\n{"step": 2}\n', "line 4 is not JSON"),
    (b"\xff\xfe\n", "not UTF-8"),
])
def test_a_malformed_metrics_file_is_named_before_anything_is_written(trained_run, tmp_path, damage, needle):
    run_dir = _copy(trained_run, tmp_path)
    with open(run_dir / "metrics.jsonl", "ab" if isinstance(damage, bytes) else "a") as f:
        f.write(damage)
    before = snapshot(str(run_dir))
    r = run_memlm("train", *SYNTH, f"run.dir={run_dir}", "train.steps=3")
    _check_error(r, "metrics.jsonl", needle)
    assert snapshot(str(run_dir)) == before


def test_a_last_line_cut_by_a_kill_is_dropped_on_resume(trained_run, tmp_path):
    run_dir = _copy(trained_run, tmp_path)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    r = run_memlm("train", *SYNTH, f"run.dir={run_dir}", "train.steps=3")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ['{"step": 1', '{"step": 2', '{"step": 3']


@pytest.mark.parametrize("content", ["garbage", "{}"])
def test_a_damaged_data_position_is_named(trained_run, tmp_path, content):
    run_dir = _copy(trained_run, tmp_path)
    (run_dir / "data_state" / "2" / "process_0.json").write_text(content)
    before = snapshot(str(run_dir))
    r = run_memlm("train", *SYNTH, f"run.dir={run_dir}", "train.steps=3")
    _check_error(r, "data_state/2/process_0.json", "data position")
    assert snapshot(str(run_dir)) == before


def test_truncated_checkpoint_data_is_one_line(trained_run, tmp_path):
    run_dir = _copy(trained_run, tmp_path)
    data = [os.path.join(root, f) for root, _, files in os.walk(run_dir / "checkpoints" / "2" / "state")
            for f in files if os.sep + "d" + os.sep in os.path.join(root, f)]
    assert data, "no array data files found: orbax's layout changed"
    for path in data:
        os.truncate(path, 10)
    before = snapshot(str(run_dir))
    r = run_memlm("eval", "lm", "--run", str(run_dir), "--max-batches", "1")
    _check_error(r, "checkpoints/2: cannot read the checkpoint")
    r = run_memlm("train", *SYNTH, f"run.dir={run_dir}", "train.steps=3")
    _check_error(r, "checkpoints/2: cannot read the checkpoint",
                 f"move {run_dir}/checkpoints/2 out of the run dir to use the earlier checkpoint 1")
    assert snapshot(str(run_dir)) == before
    # doing what the line says resumes from checkpoint 1, and the history after step 1 is replaced
    os.rename(run_dir / "checkpoints" / "2", tmp_path / "damaged_2")
    r = run_memlm("train", *SYNTH, f"run.dir={run_dir}", "train.steps=3")
    assert r.returncode == 0 and "resumed from step 1" in r.stderr, r.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3], steps


def test_damaged_corpus_cache_entry_is_named(tmp_path):
    from memlm.data.corpus import load_corpus
    from memlm.data.tokenizers import load_tokenizer

    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("some text for the cache\n" * 20)
    tok = load_tokenizer("bytes", None)
    first = load_corpus("text_dir", str(tmp_path / "texts"), "train", tok, cache_dir=str(tmp_path / "cache"))
    (entry,) = os.listdir(tmp_path / "cache" / "corpus")
    entry = tmp_path / "cache" / "corpus" / entry
    for name, junk in (("meta.json", "garbage"), ("tokens.npy", "garbage")):
        good = (entry / name).read_bytes()
        (entry / name).write_text(junk)
        with pytest.raises(UserError, match=f"{entry}: damaged corpus cache entry"):
            load_corpus("text_dir", str(tmp_path / "texts"), "train", tok, cache_dir=str(tmp_path / "cache"))
        (entry / name).write_bytes(good)
    again = load_corpus("text_dir", str(tmp_path / "texts"), "train", tok, cache_dir=str(tmp_path / "cache"))
    assert again.total_tokens == first.total_tokens


def test_safetensors_metadata_must_be_strings(tmp_path):
    import json
    import struct

    from memlm.convert import safetensors_io as st

    for meta in (5, {"memlm.config": 5}):
        header = json.dumps({"__metadata__": meta}).encode()
        path = tmp_path / "bad.safetensors"
        path.write_bytes(struct.pack("<Q", len(header)) + header)
        with pytest.raises(UserError, match="__metadata__ is not a mapping of strings"):
            st.read_header(str(path))


def test_safetensors_rewrite_of_its_own_mapped_tensors(tmp_path):
    """read() memory-maps; writing those tensors back to the same path used to truncate the file under its own
    mapping (the process died with SIGBUS). The write goes through a temporary sibling now."""
    import numpy as np

    from memlm.convert import safetensors_io as st

    path = str(tmp_path / "t.safetensors")
    st.write(path, {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.int32)})
    tensors, _ = st.read(path)
    tensors["c"] = tensors.pop("a") * 2
    st.write(path, tensors, {"note": "rewritten"})
    again, meta = st.read(path)
    assert sorted(again) == ["b", "c"] and meta == {"note": "rewritten"}
    np.testing.assert_array_equal(again["c"], np.arange(6, dtype=np.float32).reshape(2, 3) * 2)
    assert os.listdir(tmp_path) == ["t.safetensors"]
