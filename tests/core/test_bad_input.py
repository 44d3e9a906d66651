"""Bad input: one line naming the key/file, exit code 2, nothing in run.dir written or overwritten."""

import os

import pytest

from tests.core.cli_utils import ROOT, run_memlm, snapshot

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


@pytest.mark.parametrize("yaml_text, args, needle", [
    (None, ["train.grad_accum=3"], "train.grad_accum (3) does not divide train.batch_size (8)"),
    (None, ["train.bptt_depth=0"], "train.bptt_depth must be -1 (full BPTT) or >= 1"),
    (None, ["model.kind=rmt", "model.rmt.num_mem_tokens=0"], "mem_init has shape (0, 32): a zero-size array"),
    (None, ["model.kind=memory_layers", "model.memory_layers.num_values=64", "model.memory_layers.k_dim=16",
            "model.memory_layers.top_k=4", "data.n_segments=9"], "exceeds model.max_seq_len = 256"),
    (None, ["model.kind=memory_layers", "model.memory_layers.num_values=64", "model.memory_layers.k_dim=16",
            "model.memory_layers.top_k=4", "model.memory_layers.layers=[1,1]"], "lists a layer twice"),
    ("base: 5\n", [], "base: expected the path of a config file"),
    ("train: 5\n", ["train.steps=2"], "train is 5, not a mapping"),
    (b"model:\n  d_model: 32 # caf\xe9\n", [], "not UTF-8 text"),
    (None, ["distributed.enabled=true"], "distributed.enabled=true but no cluster was detected"),
    # session 16's audit: each of these used to raise a traceback, diverge, or write the run dir first
    (None, ["train.lr=.inf"], "train.lr: must be a finite number, got inf"),
    (None, ["model.vocab_size=4294967296"], "model.vocab_size: 4294967296 is out of range"),
    (None, ["run.seed=-1"], "run.seed: Input should be greater than or equal to 0"),
    (None, ["train.b1=2"], "train.b1: Input should be less than 1"),
    (None, ["model.rope_theta=0"], "model.rope_theta: Input should be greater than 0"),
    (None, ["mesh.rules={embed:[fsdp,fsdp]}"], "mesh.rules.embed = ['fsdp', 'fsdp'] names a mesh axis twice"),
    (None, ["distributed.num_processes=1", "distributed.process_id=5"],
     "distributed.process_id (5) must be < distributed.num_processes (1)"),
    (None, ["data.source=assoc_recall", "data.recall_pairs=17", "data.segment_len=64"],
     "17 pairs need distinct keys, there are 16"),
    (None, ["model.kind=hmt", "model.hmt.num_sensory=40"], "model.hmt.num_sensory (40) exceeds data.segment_len"),
    ("base: ../../../configs/tiny/baseline.yaml\ntrain:\n  steps: 3\n  steps: 5\n", [],
     "invalid YAML: key 'steps' appears twice (line 4)"),
    (None, ["model.kind=titans", "model.titans.conv_kernel=100", "model.titans.chunk_size=8"],
     "model.titans.conv_kernel (100) exceeds data.segment_len (32)"),
    (None, ["model.kind=rmt", "model.segment_local=true"], "model.segment_local applies to model.kind=baseline"),
    (None, ["model.kind=titans", "model.titans.variant=mag", "model.titans.num_longterm=8",
            "model.titans.chunk_size=8"], "model.titans.num_longterm (8) is a MAC option"),
    (None, ["data.source=babilong", "data.path=configs", "data.babilong.tasks=[qa99]"],
     "data.babilong.tasks: unknown task 'qa99'"),
    (None, ["model.kind=memory_layers", "model.memory_layers.num_values=64", "model.memory_layers.k_dim=16",
            "model.memory_layers.top_k=4", "model.memory_layers.implementation=triton"],
     "model.memory_layers.implementation: 'triton' needs a gpu backend"),
])
def test_more_bad_input_is_one_line_and_writes_nothing(tmp_path, yaml_text, args, needle):
    config = BASE[0]
    if yaml_text is not None:
        path = tmp_path / "bad.yaml"
        path.write_bytes(yaml_text if isinstance(yaml_text, bytes) else yaml_text.encode())
        config = str(path)
    run_dir = tmp_path / "run"
    r = run_memlm("train", config, *BASE[1:], "model.max_seq_len=256", "data.source=synthetic",
                  f"run.dir={run_dir}", *args)
    _check_error(r, needle)
    assert not run_dir.exists()


def test_mesh_run_and_output_paths_are_checked(tmp_path):
    """compile: arrays that do not split over the mesh and bad --devices; eval lm: bad --max-batches / --out;
    export: an output that would replace its own run; a run's config.yaml stores absolute paths."""
    r = run_memlm("compile", *BASE, "mesh.tensor=3", "--devices", "3")
    _check_error(r, "does not split evenly over mesh", "tensor=3")
    r = run_memlm("compile", *BASE, "--devices", "-2")
    _check_error(r, "--devices")
    run_dir = tmp_path / "run"
    r = run_memlm("train", *BASE, "data.source=synthetic", f"run.dir={run_dir}")
    assert r.returncode == 0, r.stderr[-2000:]
    saved = (run_dir / "config.yaml").read_text()
    assert f"dir: {run_dir}" in saved and f"path: {os.path.join(ROOT, 'data', 'books')}" in saved
    before = snapshot(str(run_dir))
    _check_error(run_memlm("eval", "lm", "--run", str(run_dir), "--max-batches", "0"), "--max-batches")
    _check_error(run_memlm("eval", "lm", "--run", str(run_dir), "--out", str(tmp_path)), "is a directory")
    for out in (run_dir, run_dir / "checkpoints", tmp_path):
        r = run_memlm("export", "--run", str(run_dir), "--format", "safetensors", "--out", str(out), "--force")
        _check_error(r, "would overwrite its own source")
    assert snapshot(str(run_dir)) == before


@pytest.mark.parametrize("argv, needle", [
    (["train"], "memlm train: error: the following arguments are required: config (see memlm train --help)"),
    (["compile", "c.yaml", "--devices", "x"], "memlm compile: error: argument --devices: invalid int value: 'x'"),
    (["eval", "lm", "--run"], "memlm eval lm: error: argument --run: expected one argument"),
    (["export", "r", "--format", "nope", "--out", "o"], "memlm export: error: argument --format: invalid choice"),
    (["import", "hf", "src"], "memlm import hf: error: the following arguments are required: --out"),
    (["data", "fetch-books"], "memlm data fetch-books: error: the following arguments are required: DIR"),
    (["train", "c.yaml", "--bogus"], "memlm: error: unrecognized arguments: --bogus (see memlm --help)"),
])
def test_usage_errors_are_one_line(argv, needle, capsys):
    """argparse's own errors keep the CLI's contract: one line (no usage block before it), exit code 2."""
    from memlm import cli

    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(needle), err
