"""BABILong result files (benchmarks.md §5).

Per-sample results are dicts ``{task, length, target, output, question, correct}`` (optionally ``input``,
``prompt``). ``BabilongWriter`` appends every sample as it finishes, so a crash loses at most the sample in
flight, and ``finalize`` writes the summaries. Layout under ``out_dir`` (cfg = prompt config name,
ts = run timestamp):

* ``{task}_{len}_{cfg}.csv`` (+ ``.json`` sidecar)  BABILong-native predictions (target,output,question);
  the sidecar is ``{prompt: {instruction, examples, post_prompt, template, chat_template, system_prompt},
  generate_kwargs}``. Appended per sample.
* ``samples_babilong_{task}_{len}_{ts}.jsonl``         lm-eval-style per-sample records
  ``{doc_id, doc, target, resps, filtered_resps, metric, acc}``. Appended per sample.
* ``results_{ts}.json``                                lm-eval-style summary. As in lm-eval, ``acc,none`` is a
  *fraction* in [0, 1]; every other file uses percent.
* ``babilong_{cfg}_matrix.csv``                        task x length accuracy (%), an ``avg`` row over qa1-5
  (-1 where any qa1-5 cell is missing), -1 for missing cells (upstream ``collect_results.py``).
* ``babilong_{cfg}_heatmap.png``, ``babilong_{cfg}_acc_vs_length.png``  plots (matplotlib, Agg canvas).
* ``babilong_summary.jsonl``                           long format (model, task, length, n, acc, stderr,
  metric, prompt_cfg, seed, date), appended by every ``finalize``.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from memlm.errors import UserError, not_utf8
from memlm.eval.babilong_data import parse_length
from memlm.eval.babilong_scorer import TASKS, check_task, get_metric, mean_stderr
from memlm.eval.prompts import PromptConfig, n_examples, parse_prompt_config_name

HEADLINE_TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")
NATIVE_COLUMNS = ("target", "output", "question")


def cell_name(task: str, length: str) -> str:
    """lm-eval task name of a cell, e.g. ``babilong_qa1_4k``."""
    return f"babilong_{task}_{length}"


def task_key(task: str) -> int:
    return int(task[2:]) if task.startswith("qa") and task[2:].isdigit() else 10**6


def as_prompt_config(cfg: PromptConfig | str | dict) -> PromptConfig:
    """Accept a PromptConfig, its name (``instruction_yes_..``/``finetuned``) or a dict of its fields."""
    if isinstance(cfg, PromptConfig):
        return cfg
    if isinstance(cfg, str):
        return parse_prompt_config_name(cfg)
    if isinstance(cfg, dict):
        try:
            return PromptConfig(**cfg)
        except TypeError as e:
            raise UserError(f"prompt_cfg: {e}") from e
    raise UserError(f"prompt_cfg: expected a PromptConfig, a name or a dict, got {type(cfg).__name__}")


def aggregate(results: Iterable[dict]) -> dict[tuple[str, str], tuple[float, int, float]]:
    """(task, length) -> (accuracy %, n, stderr %) from per-sample results."""
    cells: dict[tuple[str, str], list[bool]] = {}
    for r in results:
        cells.setdefault((r["task"], r["length"]), []).append(bool(r["correct"]))
    return {k: mean_stderr(v) for k, v in cells.items()}


def accuracy_matrix(
    scores: dict[tuple[str, str], tuple[float, int, float]],
) -> tuple[list[str], list[str], list[list[float]]]:
    """(row names, length names, values %) with -1 for missing cells and a final ``avg`` row over qa1-5."""
    lengths = sorted({length for _, length in scores}, key=parse_length)
    tasks = sorted({t for t, _ in scores}, key=task_key)
    rows = [[scores[(t, length)][0] if (t, length) in scores else -1.0 for length in lengths] for t in tasks]
    avg = []
    for length in lengths:
        vals = [scores.get((t, length)) for t in HEADLINE_TASKS]
        avg.append(-1.0 if any(v is None for v in vals) else sum(v[0] for v in vals) / len(vals))
    return tasks + ["avg"], lengths, rows + [avg]


def _git_hash() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        if out.returncode != 0:
            return None
        return out.stdout.strip() or None
    except Exception:  # no git, not a repository, ...: the hash is optional
        return None


def _fmt(v: float) -> str:
    return "-1" if v < 0 else f"{v:.2f}"


class BabilongWriter:
    """Writes BABILong outputs incrementally (``add``) and summaries at the end (``finalize``).

    ``resume=True`` keeps existing native CSVs (appending to them) instead of truncating them;
    ``existing(task, length)`` returns their rows.
    """

    def __init__(
        self,
        out_dir: str | Path,
        prompt_cfg: PromptConfig | str | dict,
        metric: str = "babilong",
        model_name: str = "memlm",
        timestamp: str | None = None,
        max_new_tokens: int = 20,
        store_inputs: bool = False,
        resume: bool = False,
        seed: int | None = None,
        config: dict | None = None,
    ):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cfg = as_prompt_config(prompt_cfg)
        get_metric(metric)
        self.metric, self.model_name, self.seed = metric, model_name, seed
        self.ts = timestamp or datetime.now().strftime("%Y-%m-%dT%H-%M-%S.%f")
        self.max_new_tokens, self.store_inputs, self.resume = max_new_tokens, store_inputs, resume
        self.config = dict(config or {})
        self.results: list[dict] = []
        self._opened: set[tuple[str, str]] = set()
        self._doc_ids: dict[tuple[str, str], int] = {}

    # -- paths ---------------------------------------------------------------------------------------------
    def native_csv(self, task: str, length: str) -> Path:
        return self.out / f"{task}_{length}_{self.cfg.name}.csv"

    def samples_jsonl(self, task: str, length: str) -> Path:
        return self.out / f"samples_{cell_name(task, length)}_{self.ts}.jsonl"

    def existing(self, task: str, length: str) -> list[dict]:
        """Rows already in the native CSV of a cell (for resuming); [] if there is none."""
        p = self.native_csv(task, length)
        return read_predictions_csv(p) if p.is_file() else []

    # -- incremental ---------------------------------------------------------------------------------------
    def _open_cell(self, task: str, length: str) -> None:
        p = self.native_csv(task, length)
        if not (self.resume and p.is_file()):
            with open(p, "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerow(NATIVE_COLUMNS)
        sidecar = {
            "prompt": self.cfg.parts(task),
            "generate_kwargs": {"max_new_tokens": self.max_new_tokens, "do_sample": False},
            "metric": self.metric,
        }
        p.with_suffix(".json").write_text(json.dumps(sidecar, indent=2), encoding="utf-8")
        self._opened.add((task, length))

    def add_existing(self, rows: Iterable[dict]) -> None:
        """Register results already on disk (resume) without writing them again."""
        for r in rows:
            self.results.append(r)
            key = (r["task"], r["length"])
            self._doc_ids[key] = self._doc_ids.get(key, 0) + 1

    def add(self, result: dict) -> None:
        """Append one finished sample to the cell's native CSV and samples JSONL."""
        task, length = check_task(result["task"]), result["length"]
        parse_length(length)
        key = (task, length)
        if key not in self._opened:
            self._open_cell(task, length)
        doc_id = self._doc_ids.get(key, 0)
        self._doc_ids[key] = doc_id + 1
        self.results.append(result)
        with open(self.native_csv(task, length), "a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow([result["target"], result["output"], result["question"]])
        doc = {"task": task, "length": length, "question": result["question"], "target": result["target"]}
        if "input" in result:
            doc["input_chars"] = len(result["input"])
            if self.store_inputs:
                doc["input"] = result["input"]
        line = {
            "doc_id": doc_id,
            "doc": doc,
            "target": result["target"],
            "resps": [[result["output"]]],
            "filtered_resps": [result["output"]],
            "metric": self.metric,
            "acc": 1.0 if result["correct"] else 0.0,
        }
        with open(self.samples_jsonl(task, length), "a", encoding="utf-8") as f:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")

    # -- summaries -----------------------------------------------------------------------------------------
    def finalize(self) -> dict:
        """Write results JSON, matrix CSV, plots and the summary JSONL.

        Returns {"scores": {(task, length): (acc %, n, stderr %)}, "paths": {kind: Path}}.
        """
        scores = aggregate(self.results)
        paths = {"results_json": self._write_results_json(scores)}
        names, lengths, values = accuracy_matrix(scores)
        base = self.out / f"babilong_{self.cfg.name}"
        paths["matrix_csv"] = Path(f"{base}_matrix.csv")
        with open(paths["matrix_csv"], "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["task", *lengths])
            for name, row in zip(names, values, strict=True):
                w.writerow([name, *[_fmt(v) for v in row]])
        paths["heatmap_png"] = plot_heatmap(
            names,
            lengths,
            values,
            Path(f"{base}_heatmap.png"),
            title=f"{self.model_name}: {self.cfg.subtitle}",
        )
        paths["acc_vs_length_png"] = plot_acc_vs_length(
            names,
            lengths,
            values,
            Path(f"{base}_acc_vs_length.png"),
            title=f"{self.model_name}: {self.cfg.subtitle}",
        )
        paths["summary_jsonl"] = self.out / "babilong_summary.jsonl"
        with open(paths["summary_jsonl"], "a", encoding="utf-8") as f:
            for (task, length), (acc, n, se) in sorted(
                scores.items(), key=lambda kv: (task_key(kv[0][0]), parse_length(kv[0][1]))
            ):
                f.write(
                    json.dumps(
                        {
                            "model": self.model_name,
                            "task": task,
                            "length": length,
                            "n": n,
                            "acc": acc,
                            "stderr": se,
                            "metric": self.metric,
                            "prompt_cfg": self.cfg.name,
                            "seed": self.seed,
                            "date": self.ts,
                        }
                    )
                    + "\n"
                )
        return {"scores": scores, "paths": paths}

    def _write_results_json(self, scores: dict) -> Path:
        results, configs, versions, nshot, hib, nsamp = {}, {}, {}, {}, {}, {}
        for (task, length), (acc, n, se) in sorted(
            scores.items(), key=lambda kv: (task_key(kv[0][0]), parse_length(kv[0][1]))
        ):
            name = cell_name(task, length)
            results[name] = {"alias": name, "acc,none": acc / 100.0, "acc_stderr,none": se / 100.0}
            shots = 0 if (self.cfg.finetuned or not self.cfg.examples) else n_examples(task)
            configs[name] = {
                "task": name,
                "tag": ["babilong"],
                "dataset_name": length,
                "test_split": task,
                "output_type": "generate_until",
                "num_fewshot": shots,
                "generation_kwargs": {"max_gen_toks": self.max_new_tokens, "do_sample": False},
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
                "metadata": {"prompt_config": self.cfg.name, "babilong_metric": self.metric},
            }
            versions[name], nshot[name], hib[name] = 1.0, shots, {"acc": True}
            nsamp[name] = {"original": n, "effective": n}
        groups, group_subtasks = {}, {}
        for length in sorted({length for _, length in scores}, key=parse_length):
            members = [
                (t, length) for t in sorted({t for t, _ in scores}, key=task_key) if (t, length) in scores
            ]
            gsets = [(f"babilong_{length}", members)]
            if all((t, length) in scores for t in HEADLINE_TASKS):
                gsets.append((f"babilong_qa1-5_{length}", [(t, length) for t in HEADLINE_TASKS]))
            for gname, cells in gsets:
                k = len(cells)
                groups[gname] = {
                    "alias": gname,
                    "acc,none": sum(scores[c][0] for c in cells) / k / 100.0,
                    # stderr of a mean of k independent cell means
                    "acc_stderr,none": math.sqrt(sum((scores[c][2] / 100.0) ** 2 for c in cells)) / k,
                }
                group_subtasks[gname] = [cell_name(*c) for c in cells]
        doc = {
            "results": results,
            "groups": groups,
            "group_subtasks": group_subtasks,
            "configs": configs,
            "versions": versions,
            "n-shot": nshot,
            "higher_is_better": hib,
            "n-samples": nsamp,
            "config": {
                "model": self.model_name,
                "model_args": self.config.get("model_args"),
                "batch_size": 1,
                "gen_kwargs": {"max_new_tokens": self.max_new_tokens, "do_sample": False},
                "prompt_config": self.cfg.name,
                "babilong_metric": self.metric,
                "seed": self.seed,
                **{k: v for k, v in self.config.items() if k != "model_args"},
            },
            "git_hash": _git_hash(),
            "date": time.time(),
        }
        path = self.out / f"results_{self.ts}.json"
        path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
        return path


def write_report(
    results: list[dict],
    out_dir: str | Path,
    prompt_cfg: PromptConfig | str | dict,
    metric: str = "babilong",
    **writer_kwargs,
) -> dict:
    """Write every output for a finished list of per-sample results (non-incremental convenience)."""
    w = BabilongWriter(out_dir, prompt_cfg, metric, **writer_kwargs)
    for r in results:
        w.add(r)
    return w.finalize()


# ----------------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API on an Agg canvas: no pyplot, no global backend switch)
# ----------------------------------------------------------------------------------------------------------


def _figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def plot_heatmap(
    names: list[str], lengths: list[str], values: list[list[float]], path: Path, title: str = ""
) -> Path:
    """Red->yellow->green heatmap, vmin 0 vmax 100, integer annotations; missing (-1) cells grey with '-'."""
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("ryg", ["red", "yellow", "green"]).with_extremes(bad="lightgray")
    arr = np.array(values, dtype=float).reshape(len(names), len(lengths))
    fig = _figure((1.5 + 0.8 * max(len(lengths), 1), 1.2 + 0.45 * max(len(names), 1)))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_less(arr, 0), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            ax.text(
                j,
                i,
                "-" if arr[i, j] < 0 else str(int(round(arr[i, j]))),
                ha="center",
                va="center",
                fontsize=9,
            )
    ax.set_xticks(range(len(lengths)), lengths)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("Context size")
    ax.set_ylabel("Tasks")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_acc_vs_length(
    names: list[str], lengths: list[str], values: list[list[float]], path: Path, title: str = ""
) -> Path:
    """Accuracy (%) against context length on a log2 x axis; "0k" is drawn at 512 tokens, labelled 0k."""
    fig = _figure((6.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    xs = [parse_length(length) or 512 for length in lengths]
    for name, row in zip(names, values, strict=True):
        pts = [(x, v) for x, v in zip(xs, row, strict=True) if v >= 0]
        if pts:
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                linewidth=2.5 if name == "avg" else 1.2,
                label=name,
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, lengths)
    ax.set_ylim(-2, 102)  # keep markers at 0 and 100 visible
    ax.set_xlabel("Context size")
    ax.set_ylabel("Accuracy, %")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


# ----------------------------------------------------------------------------------------------------------
# Rescoring saved predictions (`memlm eval babilong-score --predictions CSV --task qaN`)
# ----------------------------------------------------------------------------------------------------------


def read_predictions_csv(path: str | Path) -> list[dict]:
    """Rows ``{target, output, question}`` of a predictions CSV (extra columns, e.g. pandas' index, ignored).

    Raises UserError naming the file and row for a missing column, a short/long row or a CSV syntax error.
    """
    path = Path(path)
    try:
        f = open(path, newline="", encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from e
    rows = []
    with f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames or []
            for col in NATIVE_COLUMNS:
                if col not in header:
                    raise UserError(f"{path}: missing column '{col}' (header: {','.join(header) or 'empty'})")
            for i, row in enumerate(reader, start=1):
                if None in row or any(v is None for v in row.values()):
                    raise UserError(
                        f"{path}: row {i} (line {reader.line_num}): expected {len(header)} fields"
                    )
                rows.append({c: row[c] for c in NATIVE_COLUMNS})
        except csv.Error as e:
            raise UserError(
                f"{path}: row {len(rows) + 1} (line {reader.line_num}): malformed CSV ({e})"
            ) from e
        except UnicodeDecodeError as e:
            raise not_utf8(path, e) from None
    return rows


def rescore_predictions_csv(path: str | Path, task: str, metric: str = "babilong") -> float:
    """Accuracy (%) of a saved predictions CSV (columns target, output, question) under ``metric``."""
    check_task(task)
    rows = read_predictions_csv(path)
    if not rows:
        raise UserError(f"{path}: no prediction rows")
    fn = get_metric(metric)
    return mean_stderr([fn(r["target"], r["output"], r["question"], task) for r in rows])[0]


__all__ = [
    "TASKS",
    "BabilongWriter",
    "write_report",
    "aggregate",
    "accuracy_matrix",
    "plot_heatmap",
    "plot_acc_vs_length",
    "read_predictions_csv",
    "rescore_predictions_csv",
    "cell_name",
    "as_prompt_config",
]
