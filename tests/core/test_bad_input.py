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


TITANS = ["configs/tiny/titans_mac.yaml", "train.steps=2", "train.progress=false", "train.eval_every=0",
          "data.source=synthetic", "model.d_model=32", "model.d_ff=64", "data.segment_len=32",
          "model.titans.chunk_size=8"]


def test_resume_takes_schedule_only_options_and_names_a_changed_nested_key(tmp_path):
    """Options that change only how a step runs (config.SCHEDULE_ONLY_KEYS) may change on resume; any other
    change is refused naming its dotted key, and a warm start from a run of another model is refused before
    anything is written."""
    run_dir = tmp_path / "run"
    r = run_memlm("train", *TITANS, f"run.dir={run_dir}")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_memlm("train", *TITANS, f"run.dir={run_dir}", "train.steps=3", "model.attention_q_block=8",
                  "model.titans.chunk_remat=false", "model.remat=full")
    assert r.returncode == 0 and "resumed from step 2" in r.stderr, r.stderr[-2000:]
    before = snapshot(str(run_dir))
    r = run_memlm("train", *TITANS, f"run.dir={run_dir}", "train.steps=4", "model.titans.variant=mag")
    _check_error(r, "model.titans.variant='mac'", "'mag'", str(run_dir))
    assert snapshot(str(run_dir)) == before
    other = tmp_path / "other"
    r = run_memlm("train", *BASE, f"run.dir={other}", "data.source=synthetic", f"train.init_from={run_dir}")
    _check_error(r, "train.init_from", "checkpoint does not match", "not in the model")
    assert not other.exists()


def test_config_errors_name_the_override_and_compile_checks_the_mesh(tmp_path):
    r = run_memlm("train", *BASE, f"run.dir={tmp_path}/r", "train.steps=abc")
    _check_error(r, "override train.steps=abc: train.steps:")
    r = run_memlm("train", *TITANS, f"run.dir={tmp_path}/r", "model.titans.chunk_size=24")
    _check_error(r, "configs/tiny/titans_mac.yaml: model.titans.chunk_size (24) does not divide data.segment_len")
    assert "<root>" not in r.stderr
    r = run_memlm("compile", *BASE, "--devices", "8", "train.batch_size=6")
    _check_error(r, "train.batch_size=6 is not divisible by the 8 devices")
    r = run_memlm("compile", *BASE)  # mesh.data=-1: the device count must be given
    _check_error(r, "mesh.data=-1", "--devices")
    assert not (tmp_path / "r").exists()
