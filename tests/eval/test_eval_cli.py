"""`memlm eval babilong | babilong-score | pg19`: in-process runs with a fake model (known accuracy, crash and
resume), then the real CLI on a tiny trained run (every output file, both PG-19 scoring paths agreeing) and
bad input (exit code 2, one line)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from memlm.data.tokenizers import ByteTokenizer
from memlm.errors import UserError
from memlm.eval.babilong_data import write_babilong_json
from memlm.eval.commands import collect_samples, evaluate_babilong, parse_cells
from tests.core.cli_utils import run_memlm
from tests.data.textgen import write_pg19_tree

pytestmark = pytest.mark.integration

PNG = b"\x89PNG\r\n\x1a\n"
LOCATIONS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")


def _last_location(text: str) -> str | None:
    best, pos = None, -1
    for loc in LOCATIONS:
        i = text.rfind(loc)
        if i > pos:
            best, pos = loc, i
    return best


class FakeGenLM:
    """Answers with the last location word of the prompt; optionally crashes after `fail_after` answers."""

    def __init__(self, stateless: bool = False, max_seq_len: int = 10**9, fail_after: int | None = None):
        self.tokenizer = ByteTokenizer()
        self.stateless, self.step = stateless, 7
        self.config = SimpleNamespace(model=SimpleNamespace(max_seq_len=max_seq_len))
        self.calls, self.fail_after = 0, fail_after

    def generate(self, ids, max_new_tokens):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        text = self.tokenizer.decode(ids)
        return self.tokenizer.encode((_last_location(text) or "nowhere") + ". More")[:max_new_tokens] + [1]


@pytest.fixture(scope="module")
def books(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pg19")
    write_pg19_tree(root, {"train": [1, 2], "validation": [10, 11], "test": [20, 21]}, n_lines=60)
    return root


@pytest.fixture(scope="module")
def samples(books):
    return collect_samples(["qa1", "qa4"], ["0k", "1k"], samples=6, books=str(books), seed=3,
                           tokenizer=ByteTokenizer(), progress=False)


STATE = {"run": "/r", "step": 7, "prompt_config": "finetuned", "metric": "babilong", "max_new_tokens": 20,
         "source": {"kind": "generate", "seed": 3}}


def _run(lm, samples, out, **kw):
    args = {"prompt_config": "finetuned", "metric": "babilong", "max_new_tokens": 20, "state": STATE,
            "progress": False}
    args.update(kw)
    return evaluate_babilong(lm, samples, out, **args)


def _expected(samples) -> dict:
    return {cell: 100.0 * sum(_last_location(r["input"] + " " + r["question"]) == r["target"] for r in recs)
            / len(recs) for cell, recs in samples.items()}


def test_parse_cells():
    assert parse_cells("qa1, qa2,qa1", "0k,1k") == (["qa1", "qa2"], ["0k", "1k"])
    with pytest.raises(UserError, match="--tasks: unknown task 'qa21'"):
        parse_cells("qa1,qa21", "0k")
    with pytest.raises(UserError, match="--lengths.*3k"):
        parse_cells("qa1", "0k,3k")


def test_babilong_fake_model_accuracy_and_files(tmp_path, samples):
    res = _run(FakeGenLM(), samples, tmp_path)
    want = _expected(samples)
    assert 0 < sum(want.values()) < 100 * len(want)  # the fixture is informative (not all right or wrong)
    assert {c: v[0] for c, v in res["scores"].items()} == pytest.approx(want)
    doc = json.loads(Path(res["paths"]["results_json"]).read_text())
    assert doc["results"]["babilong_qa1_1k"]["acc,none"] == pytest.approx(want[("qa1", "1k")] / 100)
    with open(tmp_path / "qa4_0k_finetuned.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(r["output"].startswith(tuple(LOCATIONS) + ("nowhere",)) for r in rows)
    assert json.loads((tmp_path / "babilong_run.json").read_text())["step"] == 7


def test_babilong_crash_keeps_partial_results_and_resumes(tmp_path, samples):
    crashing = FakeGenLM(fail_after=9)
    with pytest.raises(RuntimeError, match="simulated"):
        _run(crashing, samples, tmp_path / "o")
    saved = sum(len(list(csv.DictReader(open(p)))) for p in (tmp_path / "o").glob("qa*_finetuned.csv"))
    assert saved == 9
    partial = [json.loads(p.read_text()) for p in (tmp_path / "o").glob("results_*.json")]
    assert len(partial) == 1 and partial[0]["config"]["partial"] is True
    assert (tmp_path / "o" / "babilong_finetuned_heatmap.png").read_bytes()[:8] == PNG

    again = FakeGenLM()
    res = _run(again, samples, tmp_path / "o")
    assert again.calls == 24 - 9  # only the missing samples are generated
    assert {c: v[0] for c, v in res["scores"].items()} == pytest.approx(_expected(samples))
    doc = json.loads(Path(res["paths"]["results_json"]).read_text())
    assert "partial" not in doc["config"]
    lines = [ln for p in (tmp_path / "o").glob("samples_babilong_*.jsonl") for ln in p.read_text().splitlines()]
    assert len(lines) == 24  # same timestamp on resume: one JSONL per cell holds all its samples

    with pytest.raises(UserError, match="different step"):
        _run(FakeGenLM(), samples, tmp_path / "o", state={**STATE, "step": 8})
    fresh = FakeGenLM()
    _run(fresh, samples, tmp_path / "o", state={**STATE, "step": 8}, restart=True)
    assert fresh.calls == 24


def test_stateless_prompts_longer_than_the_window_are_counted(tmp_path, samples):
    res = _run(FakeGenLM(stateless=True, max_seq_len=400), samples, tmp_path)
    longer = sum(len((r["input"] + " " + r["question"]).encode()) > 400 for recs in samples.values() for r in recs)
    assert res["truncated_prompts"] == longer == 12  # the 1k cells (700-byte contexts)


def test_collect_samples_released_layout_and_errors(tmp_path, samples, books):
    for (t, x), recs in samples.items():
        write_babilong_json(tmp_path / "rel" / "data" / t / f"{x}.json", recs)
    got = collect_samples(["qa1", "qa4"], ["0k", "1k"], data=str(tmp_path / "rel"), samples=4)
    assert got == {c: r[:4] for c, r in samples.items()}
    with pytest.raises(UserError, match="--books"):
        collect_samples(["qa1"], ["1k"], samples=2, tokenizer=ByteTokenizer(), progress=False)
    with pytest.raises(UserError, match="qa7"):
        collect_samples(["qa7"], ["0k"], samples=2, tokenizer=ByteTokenizer(), progress=False)
    # generated samples are cached in the released layout and read back on resume
    cache = tmp_path / "cache"
    a = collect_samples(["qa1"], ["1k"], samples=2, books=str(books), seed=1, tokenizer=ByteTokenizer(),
                        cache_dir=cache, progress=False)
    assert (cache / "data" / "qa1" / "1k.json").is_file()
    cached = json.loads((cache / "data" / "qa1" / "1k.json").read_text())
    cached[0]["target"] = "edited"
    (cache / "data" / "qa1" / "1k.json").write_text(json.dumps(cached))
    kw = {"samples": 2, "books": str(books), "seed": 1, "tokenizer": ByteTokenizer(), "cache_dir": cache,
          "progress": False}
    assert collect_samples(["qa1"], ["1k"], reuse_cache=True, **kw)[("qa1", "1k")][0]["target"] == "edited"
    assert collect_samples(["qa1"], ["1k"], **kw) == a  # no reuse: rebuilt, identical for the same seed


# ------------------------------------------------------------------------------------------------------------
# The real CLI on a tiny trained run
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("runs") / "tiny"
    r = run_memlm("train", "configs/tiny/baseline.yaml", "data.source=synthetic", "train.steps=3", f"run.dir={d}",
                  "model.segment_local=true", "model.d_model=32", "model.d_ff=64", "data.segment_len=64",
                  "train.batch_size=8", "train.progress=false", "train.eval_every=0")
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def _one_error_line(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memlm: error:"), r.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_babilong_generate_writes_every_output(run_dir, books, tmp_path):
    out = tmp_path / "bl"
    r = run_memlm("eval", "babilong", "--run", str(run_dir), "--generate", "--tasks", "qa1,qa2", "--lengths",
                  "0k,1k", "--samples", "2", "--books", str(books), "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "lengths count bytes tokens, not GPT-2" in r.stderr  # the fallback is said on stderr ...
    summary = json.loads(r.stdout)
    assert "fallback" in summary["length_tokenizer"]
    results = json.loads(next(out.glob("results_*.json")).read_text())
    assert "fallback" in results["config"]["length_tokenizer"]  # ... and in the results
    cells = [(t, x) for t in ("qa1", "qa2") for x in ("0k", "1k")]
    assert set(results["results"]) == {f"babilong_{t}_{x}" for t, x in cells}
    for t, x in cells:
        res = results["results"][f"babilong_{t}_{x}"]
        assert 0.0 <= res["acc,none"] <= 1.0 and results["n-samples"][f"babilong_{t}_{x}"]["original"] == 2
        with open(out / f"{t}_{x}_finetuned.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 2 and set(rows[0]) == {"target", "output", "question"}
        sidecar = json.loads((out / f"{t}_{x}_finetuned.json").read_text())
        assert sidecar["generate_kwargs"]["max_new_tokens"] == 20
        jl = [json.loads(ln) for ln in next(out.glob(f"samples_babilong_{t}_{x}_*.jsonl")).read_text().splitlines()]
        assert len(jl) == 2 and {"doc", "target", "resps", "filtered_resps", "acc"} <= set(jl[0])
        recs = json.loads((out / "generated" / "data" / t / f"{x}.json").read_text())
        assert len(recs) == 2
        if x == "1k":  # 1000 - 300 byte tokens of context (the model's tokenizer counts the length)
            assert all(666 <= len(rec["input"].encode()) <= 700 for rec in recs)
    with open(out / "babilong_finetuned_matrix.csv", newline="") as f:
        matrix = list(csv.reader(f))
    assert matrix[0] == ["task", "0k", "1k"] and [m[0] for m in matrix[1:]] == ["qa1", "qa2", "avg"]
    assert matrix[-1][1:] == ["-1", "-1"]  # avg needs qa1-qa5
    for png in ("babilong_finetuned_heatmap.png", "babilong_finetuned_acc_vs_length.png"):
        assert (out / png).read_bytes()[:8] == PNG
    assert len((out / "babilong_summary.jsonl").read_text().splitlines()) == 4


def test_cli_pg19_both_scoring_paths_agree(run_dir, books, tmp_path):
    # The same weights as a model without memory: windows of 64 tokens = the 64-token segments of the
    # segment-local run, so both paths see the same contexts and must give the same NLLs.
    stateless = tmp_path / "stateless_run"
    shutil.copytree(run_dir, stateless)
    cfg = (stateless / "config.yaml").read_text()
    cfg = cfg.replace("segment_local: true", "segment_local: false").replace("max_seq_len: 512", "max_seq_len: 64")
    (stateless / "config.yaml").write_text(cfg.replace("n_segments: 2", "n_segments: 1"))
    docs = {}
    for name, run in (("memory", run_dir), ("stateless", stateless)):
        out = tmp_path / name
        r = run_memlm("eval", "pg19", "--run", str(run), "--data", str(books), "--split", "validation",
                      "--out", str(out), "--batch-size", "2", "--no-progress")
        assert r.returncode == 0, r.stderr[-3000:]
        doc = json.loads((out / "pg19_validation.json").read_text())
        assert doc["tokenizer"] == "bytes" and doc["books"] == 2
        assert doc["word_count_source"].startswith("whitespace") and "not the official" in doc["dataset"]
        assert doc["bytes"] == doc["scored_tokens"]  # bytes tokenizer: text tokens - first + eos
        for k in ("word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity"):
            assert math.isfinite(doc[k]) and doc[k] > 0
        assert doc["byte_perplexity"] == pytest.approx(2 ** doc["bits_per_byte"])
        assert sum(s["tokens"] for s in doc["segments"]) == doc["scored_tokens"]
        assert (out / "pg19_validation_ppl_by_segment.png").read_bytes()[:8] == PNG
        assert len((out / "pg19_validation_books.jsonl").read_text().splitlines()) == 2
        docs[name] = doc
    assert "memory reset per book" in docs["memory"]["scoring"] and "windows" in docs["stateless"]["scoring"]
    assert docs["memory"]["token_nll"] == pytest.approx(docs["stateless"]["token_nll"], rel=1e-4)
    for a, b in zip(docs["memory"]["segments"], docs["stateless"]["segments"], strict=True):
        assert a["tokens"] == b["tokens"] and a["nll"] == pytest.approx(b["nll"], abs=5e-3)


def test_cli_babilong_score(tmp_path):
    p = tmp_path / "qa1_0k_x.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["target", "output", "question"])
        w.writerow(["kitchen", "kitchen", "Where is Mary? "])  # right
        w.writerow(["hallway", "The milk is in the kitchen.", "Where is the milk? "])  # wrong label
        w.writerow(["office", "bathroom, then office", "Where is John? "])  # two labels: wrong
        w.writerow(["garden", "Garden. Then the kitchen", "Where is Daniel? "])  # first sentence only: right
    r = run_memlm("eval", "babilong-score", "--predictions", str(p), "--task", "qa1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "50"
    r = run_memlm("eval", "babilong-score", "--predictions", str(p), "--metric", "lm_eval")  # task from name
    assert r.stdout.strip().splitlines()[-1] == "75"


def test_cli_bad_input_exits_2_with_one_line(run_dir, tmp_path):
    base = ["eval", "babilong", "--run", str(run_dir), "--out", str(tmp_path / "o")]
    _one_error_line(run_memlm(*base, "--generate", "--tasks", "qa1,qa99"), "--tasks", "qa99")
    _one_error_line(run_memlm(*base, "--generate", "--lengths", "0k,3k"), "--lengths", "3k")
    bad = tmp_path / "rel" / "data" / "qa1" / "0k.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps([{"input": "a", "question": "q", "target": "t"}, {"input": "b", "question": "q"}]))
    _one_error_line(run_memlm(*base, "--data", str(tmp_path / "rel"), "--tasks", "qa1", "--lengths", "0k"),
                    str(bad), "record 1", "target")
    nometa = tmp_path / "pg"
    (nometa / "validation").mkdir(parents=True)
    (nometa / "validation" / "5.txt").write_text("A book.")
    _one_error_line(run_memlm("eval", "pg19", "--run", str(run_dir), "--data", str(nometa), "--out",
                              str(tmp_path / "p")), "metadata.csv")
    write_pg19_tree(tmp_path / "good", {"validation": [3]})
    _one_error_line(run_memlm("eval", "pg19", "--run", str(tmp_path), "--data", str(tmp_path / "good"), "--out",
                              str(tmp_path / "p")), "not a memlm run directory")
    csvp = tmp_path / "preds.csv"
    csvp.write_text("target,question\nkitchen,Where? \n")
    _one_error_line(run_memlm("eval", "babilong-score", "--predictions", str(csvp), "--task", "qa1"),
                    str(csvp), "output")
    assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists()


def test_non_finite_output_is_one_line_with_exit_code_1(monkeypatch, capsys):
    """`memlm eval lm` on a model whose NLL is NaN: the CLI prints NonFiniteOutput's one line, exit code 1."""
    from memlm import cli
    from memlm.errors import NonFiniteOutput
    from memlm.eval import lm as eval_lm_module

    def diverged(run_dir, split, max_batches=None, out=None, step=None):
        raise NonFiniteOutput(f"eval lm {run_dir} ({split}): the mean token NLL is nan")

    monkeypatch.setattr(eval_lm_module, "eval_lm", diverged)
    rc = cli.main(["eval", "lm", "--run", "/nowhere", "--split", "validation"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err == "memlm: non-finite: eval lm /nowhere (validation): the mean token NLL is nan"
