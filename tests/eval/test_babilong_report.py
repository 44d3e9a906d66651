"""BABILong prompts, result files (lm-eval JSON/JSONL, matrix CSV, native CSVs, plots), rescoring and the
run_babilong loop with fake generators of known accuracy."""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest

from memlm.errors import UserError
from memlm.eval.babilong import run_babilong
from memlm.eval.babilong_data import build_dataset
from memlm.eval.babilong_report import (
    BabilongWriter,
    read_predictions_csv,
    rescore_predictions_csv,
    write_report,
)
from memlm.eval.prompts import (
    DEFAULT_CHAT_TEMPLATE,
    PROMPTS,
    PromptConfig,
    finetuned_input,
    format_prompt,
    n_examples,
    parse_prompt_config_name,
    prompt_config_name,
)

pytestmark = pytest.mark.unit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------------------


def test_format_prompt_template_and_switches():
    p = PROMPTS["qa1"]
    full = format_prompt("qa1", "  Mary went to the office.\n", "Where is Mary? ")
    assert full == (
        f"{p['instruction']}\n\n{p['examples']}\n\n{p['post_prompt']}\n\n<context>\n"
        "Mary went to the office.\n</context>\n\nQuestion: Where is Mary?"
    )
    assert format_prompt("qa1", "c", "q?", instruction=False).startswith("<example>")
    no_ex = format_prompt("qa1", "c", "q?", examples=False)
    assert f"{p['instruction']}\n\n\n\n{p['post_prompt']}" in no_ex  # empty part keeps its blank lines
    assert format_prompt("qa1", "c", "q?", False, False, False) == "<context>\nc\n</context>\n\nQuestion: q?"
    chat = format_prompt("qa1", "c", "q?", chat_template=True)
    assert chat == DEFAULT_CHAT_TEMPLATE.replace(
        "{prompt}", full.replace("Mary went to the office.", "c").replace("Where is Mary?", "q?")
    )
    assert format_prompt("qa1", "c", "q?", False, False, False, chat_template="[U]{prompt}[A]") == (
        "[U]<context>\nc\n</context>\n\nQuestion: q?[A]"
    )
    with pytest.raises(UserError, match="chat_template"):
        format_prompt("qa1", "c", "q?", chat_template="no placeholder")
    with pytest.raises(UserError, match="qa21"):
        format_prompt("qa21", "c", "q?")
    assert finetuned_input("Mary went home.", "Where is Mary? ") == "Mary went home. Where is Mary? "


def test_all_tasks_have_prompts():
    assert set(PROMPTS) == {f"qa{i}" for i in range(1, 21)}
    for task, parts in PROMPTS.items():
        assert all(parts[k].strip() for k in ("instruction", "examples", "post_prompt"))
        assert 2 <= n_examples(task) <= 3
        assert parts["examples"].count("</example>") == n_examples(task)


def test_prompt_config_names():
    assert prompt_config_name(True, False, True) == "instruction_yes_examples_no_post_prompt_yes"
    assert prompt_config_name(True, True, False, chat_template=False) == (
        "instruction_yes_examples_yes_post_prompt_no_chat_template_no"
    )
    assert (
        PromptConfig(chat_template=True).name
        == "instruction_yes_examples_yes_post_prompt_yes_chat_template_yes"
    )
    for cfg in (PromptConfig(), PromptConfig(False, True, False, True), PromptConfig(finetuned=True)):
        assert parse_prompt_config_name(cfg.name) == cfg
    assert parse_prompt_config_name("instruction_no_examples_no_post_prompt_yes") == PromptConfig(
        False, False, True
    )
    for bad in ("instruction_maybe_examples_no_post_prompt_yes", "examples_no", "foo"):
        with pytest.raises(UserError, match="prompt config"):
            parse_prompt_config_name(bad)


# ------------------------------------------------------------------------------------------------------------
# Report files from a hand-made result set
# ------------------------------------------------------------------------------------------------------------


def _r(task, length, correct, target="office"):
    return {
        "task": task,
        "length": length,
        "target": target,
        "output": target if correct else "kitchen",
        "question": "Where is Mary? ",
        "correct": correct,
    }


RESULTS = (
    [_r("qa1", "1k", c) for c in (1, 1, 1, 0)]
    + [_r("qa1", "2k", c) for c in (1, 0)]
    + [_r("qa2", "1k", 1), _r("qa2", "1k", 1)]
    + [_r(t, "1k", 1) for t in ("qa3", "qa4", "qa5")]
)
TS = "2025-01-01T00-00-00.000000"


@pytest.fixture()
def report(tmp_path):
    out = write_report(RESULTS, tmp_path, PromptConfig(), model_name="toy", timestamp=TS, seed=3)
    return tmp_path, out


def test_results_json_lm_eval_style(report):
    d, out = report
    doc = json.loads((d / f"results_{TS}.json").read_text())
    for key in (
        "results",
        "groups",
        "configs",
        "versions",
        "n-shot",
        "higher_is_better",
        "n-samples",
        "config",
        "date",
    ):
        assert key in doc
    r = doc["results"]["babilong_qa1_1k"]
    assert r["alias"] == "babilong_qa1_1k"
    assert math.isclose(r["acc,none"], 0.75)  # lm-eval stores fractions
    assert math.isclose(r["acc_stderr,none"], statistics.stdev([1, 1, 1, 0]) / 2)
    assert math.isclose(doc["results"]["babilong_qa1_2k"]["acc,none"], 0.5)
    assert set(doc["results"]) == {
        "babilong_qa1_1k",
        "babilong_qa1_2k",
        "babilong_qa2_1k",
        "babilong_qa3_1k",
        "babilong_qa4_1k",
        "babilong_qa5_1k",
    }
    assert math.isclose(doc["groups"]["babilong_qa1-5_1k"]["acc,none"], 0.95)
    assert "babilong_qa1-5_2k" not in doc["groups"]
    assert doc["n-samples"]["babilong_qa1_1k"] == {"original": 4, "effective": 4}
    assert doc["n-shot"]["babilong_qa1_1k"] == n_examples("qa1")
    assert doc["higher_is_better"]["babilong_qa2_1k"] == {"acc": True}
    assert doc["config"]["model"] == "toy" and doc["config"]["babilong_metric"] == "babilong"
    assert out["scores"][("qa1", "1k")][:2] == (75.0, 4)


def test_samples_jsonl(report):
    d, _ = report
    lines = [json.loads(x) for x in (d / f"samples_babilong_qa1_1k_{TS}.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    assert [x["acc"] for x in lines] == [1.0, 1.0, 1.0, 0.0]
    assert [x["doc_id"] for x in lines] == [0, 1, 2, 3]
    x = lines[3]
    assert x["target"] == "office" and x["resps"] == [["kitchen"]] and x["filtered_resps"] == ["kitchen"]
    assert x["metric"] == "babilong" and x["doc"]["question"] == "Where is Mary? "


def test_matrix_csv(report):
    d, _ = report
    rows = list(csv.reader(open(d / f"babilong_{PromptConfig().name}_matrix.csv")))
    assert rows[0] == ["task", "1k", "2k"]
    table = {r[0]: [float(v) for v in r[1:]] for r in rows[1:]}
    assert [r[0] for r in rows[1:]] == ["qa1", "qa2", "qa3", "qa4", "qa5", "avg"]
    assert table["qa1"] == [75.0, 50.0]
    assert table["qa2"] == [100.0, -1.0]  # missing cell
    assert table["avg"] == [95.0, -1.0]  # -1 where any qa1-5 cell is missing


def test_native_csvs_and_rescore(report):
    d, _ = report
    name = PromptConfig().name
    p = d / f"qa1_1k_{name}.csv"
    rows = list(csv.DictReader(open(p)))
    assert list(rows[0]) == ["target", "output", "question"] and len(rows) == 4
    assert rows[3] == {"target": "office", "output": "kitchen", "question": "Where is Mary? "}
    side = json.loads(p.with_suffix(".json").read_text())
    assert set(side["prompt"]) == {
        "instruction",
        "examples",
        "post_prompt",
        "template",
        "chat_template",
        "system_prompt",
    }
    assert side["generate_kwargs"]["max_new_tokens"] == 20
    assert rescore_predictions_csv(p, "qa1") == 75.0
    assert rescore_predictions_csv(d / f"qa1_2k_{name}.csv", "qa1") == 50.0
    assert rescore_predictions_csv(p, "qa1", metric="lm_eval") == 75.0


def test_plots_are_valid_pngs(report):
    import matplotlib.image as mpimg

    d, out = report
    for key in ("heatmap_png", "acc_vs_length_png"):
        path = out["paths"][key]
        assert path.read_bytes()[:8] == PNG_MAGIC
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_summary_jsonl(report):
    d, _ = report
    rows = [json.loads(x) for x in (d / "babilong_summary.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert rows[0] == {
        "model": "toy",
        "task": "qa1",
        "length": "1k",
        "n": 4,
        "acc": 75.0,
        "stderr": pytest.approx(25.0),
        "metric": "babilong",
        "prompt_cfg": PromptConfig().name,
        "seed": 3,
        "date": TS,
    }


def test_incremental_writes_survive_a_crash(tmp_path):
    w = BabilongWriter(tmp_path, "instruction_no_examples_no_post_prompt_yes", timestamp=TS)
    w.add(_r("qa1", "4k", 1))
    w.add(_r("qa1", "4k", 0))
    # no finalize(): the per-sample files already hold both samples
    assert len((tmp_path / f"samples_babilong_qa1_4k_{TS}.jsonl").read_text().splitlines()) == 2
    csv_path = tmp_path / "qa1_4k_instruction_no_examples_no_post_prompt_yes_chat_template_no.csv"
    assert rescore_predictions_csv(csv_path, "qa1") == 50.0


@pytest.mark.parametrize(
    "content,needle",
    [
        ("target,output\nx,y\n", "missing column 'question'"),
        ("target,output,question\nx,y,z\na,b\n", "row 2 (line 3)"),
        ("target,output,question\nx,y,z,w\n", "row 1 (line 2)"),
        ("", "missing column 'target'"),
        ("target,output,question\n", "no prediction rows"),
    ],
)
def test_rescore_errors(tmp_path, content, needle):
    p = tmp_path / "preds.csv"
    p.write_text(content)
    with pytest.raises(UserError) as e:
        rescore_predictions_csv(p, "qa1")
    assert str(p) in str(e.value) and needle in str(e.value)


def test_rescore_upstream_pandas_layout(tmp_path):
    p = tmp_path / "qa8.csv"
    p.write_text(
        ',target,output,question\n0,"apple,milk","milk, apple.\nthen",What is Mary carrying? \n'
        "1,nothing,apple,What is Mary carrying? \n"
    )
    assert read_predictions_csv(p)[0]["output"] == "milk, apple.\nthen"
    assert rescore_predictions_csv(p, "qa8") == 50.0
    with pytest.raises(UserError, match="qa0"):
        rescore_predictions_csv(p, "qa0")


# ------------------------------------------------------------------------------------------------------------
# run_babilong with fake generators
# ------------------------------------------------------------------------------------------------------------


class ByteTok:
    eos_id = 0

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


TOK = ByteTok()


@pytest.fixture(scope="module")
def cells():
    return {
        ("qa1", "0k"): build_dataset("qa1", "0k", 6, None, TOK, seed=1),
        ("qa2", "0k"): build_dataset("qa2", "0k", 4, None, TOK, seed=1),
    }


def _oracle(cells, cfg, wrong=frozenset()):
    """generate_fn answering correctly from the record, except records whose (task, index) is in ``wrong``."""
    answers = {}
    for (task, _), recs in cells.items():
        for i, rec in enumerate(recs):
            ans = "I could not tell" if (task, i) in wrong else f"The answer is {rec['target']}"
            answers[tuple(TOK.encode(cfg.format(task, rec["input"], rec["question"])))] = ans
    calls = []

    def gen(ids, max_new_tokens):
        calls.append(max_new_tokens)
        # EOS ends the answer; the label after it must be ignored
        return TOK.encode(answers[tuple(ids)]) + [TOK.eos_id] + TOK.encode(" kitchen office")

    return gen, calls


def test_run_babilong_exact_accuracy(tmp_path, cells):
    cfg = PromptConfig()
    gen, calls = _oracle(cells, cfg, wrong={("qa1", 0), ("qa1", 3), ("qa2", 2)})
    out = run_babilong(gen, TOK, cells, tmp_path, cfg, max_new_tokens=7, progress=False, timestamp=TS)
    assert len(calls) == 10 and set(calls) == {7}
    assert out["scores"][("qa1", "0k")][:2] == (pytest.approx(400 / 6), 6)
    assert out["scores"][("qa2", "0k")][:2] == (75.0, 4)
    doc = json.loads(out["paths"]["results_json"].read_text())
    assert math.isclose(doc["results"]["babilong_qa2_0k"]["acc,none"], 0.75)
    assert rescore_predictions_csv(tmp_path / f"qa1_0k_{cfg.name}.csv", "qa1") == pytest.approx(400 / 6)
    outputs = [r["output"] for r in csv.DictReader(open(tmp_path / f"qa2_0k_{cfg.name}.csv"))]
    assert outputs[0].startswith("The answer is ") and "office" not in outputs[0].replace(
        cells[("qa2", "0k")][0]["target"], ""
    )


def test_run_babilong_garbage_and_finetuned(tmp_path, cells):
    out = run_babilong(
        lambda ids, n: TOK.encode("no idea"),
        TOK,
        cells,
        tmp_path / "g",
        "finetuned",
        metric="exact",
        progress=False,
    )
    assert all(acc == 0.0 for acc, _, _ in out["scores"].values())
    seen = []

    def echo_target(ids, n):  # fine-tuned prompt is input + " " + question; answer exactly
        text = TOK.decode(ids)
        seen.append(text)
        rec = next(r for rs in cells.values() for r in rs if text == r["input"] + " " + r["question"])
        return TOK.encode(rec["target"])

    out = run_babilong(
        echo_target, TOK, cells, tmp_path / "f", PromptConfig(finetuned=True), metric="exact", progress=True
    )
    assert all(acc == 100.0 for acc, _, _ in out["scores"].values()) and len(seen) == 10


def test_run_babilong_resume_after_crash(tmp_path, cells):
    cfg = PromptConfig(examples=False)
    gen, calls = _oracle(cells, cfg, wrong={("qa1", 1)})
    budget = [4]

    def crashing(ids, n):
        if budget[0] == 0:
            raise RuntimeError("device lost")
        budget[0] -= 1
        return gen(ids, n)

    with pytest.raises(RuntimeError):
        run_babilong(crashing, TOK, cells, tmp_path, cfg, progress=False, timestamp="t1")
    assert len(list(csv.DictReader(open(tmp_path / f"qa1_0k_{cfg.name}.csv")))) == 4  # partial results kept
    calls.clear()
    out = run_babilong(gen, TOK, cells, tmp_path, cfg, progress=False, timestamp="t2", resume=True)
    assert len(calls) == 6  # only the missing samples are generated
    assert out["scores"][("qa1", "0k")][:2] == (pytest.approx(500 / 6), 6)
    assert out["scores"][("qa2", "0k")][:2] == (100.0, 4)
    other = {("qa1", "0k"): list(reversed(cells[("qa1", "0k")]))}
    with pytest.raises(UserError, match="does not match"):
        run_babilong(gen, TOK, other, tmp_path, cfg, progress=False, resume=True)
