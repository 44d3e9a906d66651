"""Bad input: one line naming the key/file, exit code 2, nothing in run.dir written or overwritten."""

import os

import pytest

from tests.core.cli_utils import run_memlm, snapshot

pytestmark = pytest.mark.integration

BASE = ["configs/tiny/baseline.yaml", "train.steps=2", "train.progress=false", "train.eval_every=0",
        "model.d_model=32", "model.d_ff=64", "data.segment_len=32"]


def _check_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("memlm: error:")]
    assert len(lines) == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_unknown_config_key_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    r = run_memlm("train", *BASE, f"run.dir={run_dir}", "train.stepz=3")
    _check_error(r, "train.stepz", "unknown key")
    assert not run_dir.exists()


def test_bad_value_names_the_key(tmp_path):
    r = run_memlm("train", *BASE, f"run.dir={tmp_path}/r", "model.n_heads=3")
    _check_error(r, "model")


def test_missing_data_directory(tmp_path):
    run_dir = tmp_path / "run"
    r = run_memlm("train", *BASE, f"run.dir={run_dir}", f"data.path={tmp_path}/nowhere")
    _check_error(r, "nowhere")
    assert not run_dir.exists()


def test_empty_corpus(tmp_path):
    corpus = tmp_path / "texts"
    corpus.mkdir()
    (corpus / "a.txt").write_text("")
    run_dir = tmp_path / "run"
    r = run_memlm("train", *BASE, f"run.dir={run_dir}", "data.source=text_dir", f"data.path={corpus}")
    _check_error(r, str(corpus))
    assert not run_dir.exists()


def test_unreadable_tokenizer_file(tmp_path):
    bad = tmp_path / "tok.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    run_dir = tmp_path / "run"
    r = run_memlm("train", *BASE, f"run.dir={run_dir}", "data.source=synthetic", "data.tokenizer=sentencepiece",
                  f"data.tokenizer_path={bad}", "model.vocab_size=1000")
    _check_error(r, "tok.model")
    assert not run_dir.exists()


def test_checkpoint_that_does_not_match_the_config(tmp_path):
    run_dir = tmp_path / "run"
    r = run_memlm("train", *BASE, f"run.dir={run_dir}", "data.source=synthetic")
    assert r.returncode == 0, r.stderr[-2000:]
    before = snapshot(str(run_dir))
    r = run_memlm("train", *BASE, f"run.dir={run_dir}", "data.source=synthetic", "model.d_model=64",
                  "train.steps=4")
    _check_error(r, "model.d_model", str(run_dir))
    assert snapshot(str(run_dir)) == before
    assert os.path.exists(run_dir / "config.yaml")
