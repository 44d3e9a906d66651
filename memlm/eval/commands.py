"""`memlm eval babilong | babilong-score | pg19 | recall` (memlm/cli.py registers them through ``add_eval_commands``).

Bad input (unknown task or length, a malformed data file, a PG-19 tree without metadata.csv, ...) raises
UserError, which the CLI prints as one line with exit code 2. Inputs are validated before the model is
loaded, so such errors come back in about a second.

Results are written as they are produced and a rerun of the same command resumes:

* BABILong: ``OUT/babilong_run.json`` records the evaluation (run, checkpoint step, prompt config, metric,
  data source); per-sample rows are appended to the native CSVs. A rerun with the same record keeps the
  finished samples and continues; a different record is refused unless ``--restart``. After a crash or
  Ctrl-C the summaries (results JSON, matrix, plots) are written for the samples done so far.
* PG-19: ``OUT/pg19_{split}_run.json`` + ``OUT/pg19_{split}_books.jsonl`` (memlm.eval.pg19).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from memlm.errors import UserError, check_output_dir, check_output_file

__all__ = ["add_eval_commands", "parse_cells", "length_tokenizer", "collect_samples", "evaluate_babilong"]

DEFAULT_TASKS = "qa1,qa2,qa3,qa4,qa5"
DEFAULT_LENGTHS = "0k,1k,2k,4k"
STATE_FILE = "babilong_run.json"


def _warn(msg: str) -> None:
    print(f"memlm: warning: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# BABILong: inputs
# ----------------------------------------------------------------------------------------------------------


def parse_cells(tasks: str, lengths: str) -> tuple[list[str], list[str]]:
    """Validate ``--tasks qa1,qa2`` and ``--lengths 0k,1k`` (UserError naming the bad item)."""
    from memlm.eval.babilong_data import parse_length
    from memlm.eval.babilong_scorer import check_task

    ts = [t.strip() for t in tasks.split(",") if t.strip()]
    ls = [x.strip() for x in lengths.split(",") if x.strip()]
    if not ts:
        raise UserError("--tasks: no task given (e.g. qa1,qa2)")
    if not ls:
        raise UserError("--lengths: no length given (e.g. 0k,1k)")
    for t in ts:
        try:
            check_task(t)
        except UserError:
            raise UserError(f"--tasks: unknown task {t!r}; expected qa1..qa20") from None
    for x in ls:
        try:
            parse_length(x)
        except UserError as e:
            raise UserError(f"--lengths: {str(e).removeprefix('length: ')}") from None
    return list(dict.fromkeys(ts)), list(dict.fromkeys(ls))


def length_tokenizer(gpt2_path: str | None, model_tokenizer) -> tuple[object, str, bool]:
    """(tokenizer that counts BABILong lengths, description, is_fallback).

    BABILong lengths are GPT-2 tokens (benchmarks.md §1.1): a tiktoken GPT-2 ranks file (e.g. whisper's
    assets/gpt2.tiktoken) gives the released definition; without one the model's own tokenizer is used and
    the lengths are not those of the released data.
    """
    if gpt2_path:
        from memlm.data.tokenizers import GPT2Tokenizer

        tok = GPT2Tokenizer(gpt2_path)
        return tok, f"gpt2 ({gpt2_path})", False
    name = getattr(model_tokenizer, "name", "?")
    return (model_tokenizer,
            f"{name} (fallback: no --gpt2-tokenizer given; lengths count {name} tokens, not GPT-2 tokens, "
            "so they differ from the released BABILong lengths)", True)


def _babi_file(babi_dir: str | None, task: str) -> str | None:
    if not babi_dir:
        return None
    hits = sorted(Path(babi_dir).glob(f"{task}_*_train.txt"))
    if not hits:
        raise UserError(f"{babi_dir}: no bAbI file {task}_*_train.txt")
    return str(hits[0])


def check_generate_inputs(tasks: list[str], lengths: list[str], books: str | None, books_split: str,
                          babi_dir: str | None) -> None:
    """What --generate needs: books for lengths above 0k, bAbI files for tasks beyond qa5."""
    from memlm.eval import babilong_data as bd

    if any(bd.parse_length(x) > 0 for x in lengths):
        if not books:
            raise UserError("--books: lengths above 0k need background books (a PG-19-layout directory; "
                            "`memlm data fetch-books DIR` makes one)")
        bd.list_books(books, books_split)
    for t in tasks:
        if t not in ("qa1", "qa2", "qa3", "qa4", "qa5"):
            if not babi_dir:
                raise UserError(f"--tasks: the generator covers qa1-qa5; {t} needs --babi-dir with bAbI files")
            _babi_file(babi_dir, t)


def collect_samples(tasks: list[str], lengths: list[str], *, data: str | None = None, samples: int | None = None,
                    books: str | None = None, books_split: str = "test", seed: int = 0, tokenizer=None,
                    babi_dir: str | None = None, cache_dir: str | Path | None = None, reuse_cache: bool = False,
                    progress: bool = True) -> dict[tuple[str, str], list[dict]]:
    """Records {input, question, target} per (task, length): from a released-layout directory (``data``)
    or generated (``tokenizer`` counts the lengths). Generated cells are cached in the released layout under
    ``cache_dir`` (``cache_dir/data/{task}/{length}.json``); ``reuse_cache`` reads them back (resume)."""
    from memlm.eval import babilong_data as bd

    cells = [(t, x) for t in tasks for x in lengths]
    out: dict[tuple[str, str], list[dict]] = {}
    if data is not None:
        for t, x in cells:
            recs = bd.load_babilong_dir(data, t, x)
            if not recs:
                raise UserError(f"{data}: no records for {t} at {x}")
            out[(t, x)] = recs[:samples] if samples else recs
        return out
    n = samples or 100
    check_generate_inputs(tasks, lengths, books, books_split, babi_dir)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cells), desc="building samples", unit="cell", dynamic_ncols=True)
    try:
        for t, x in cells:
            cached = Path(cache_dir) / "data" / t / f"{x}.json" if cache_dir else None
            if reuse_cache and cached is not None and cached.is_file():
                recs = bd.read_babilong_json(cached)
            else:
                recs = bd.build_dataset(t, x, n, books, tokenizer, seed, babi_path=_babi_file(babi_dir, t),
                                        split=books_split)
                if cached is not None:
                    bd.write_babilong_json(cached, recs)
            out[(t, x)] = recs
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out


# ----------------------------------------------------------------------------------------------------------
# BABILong: evaluation with resume and partial results
# ----------------------------------------------------------------------------------------------------------


def _check_state(out: Path, state: dict, restart: bool) -> tuple[bool, str | None]:
    """(resume?, timestamp to reuse). UserError if OUT holds a different evaluation and not --restart."""
    path = out / STATE_FILE
    if restart or not path.is_file():
        return False, None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{path}: not valid JSON (use --restart to start over)") from None
    if not isinstance(old, dict):
        raise UserError(f"{path}: not a BABILong evaluation state (use --restart to start over)")
    diff = [k for k in state if old.get(k) != state[k]]
    if diff:
        raise UserError(f"{out}: holds a BABILong evaluation with different {', '.join(diff)}; "
                        "use --restart to discard it or another --out")
    return True, old.get("timestamp")


def _finalize_partial(out: Path, cells: list[tuple[str, str]], prompt_cfg: str, metric: str, timestamp: str,
                      writer_kwargs: dict) -> dict | None:
    """Summaries (results JSON, matrix, plots) of the rows saved so far; None if there are none."""
    from memlm.eval.babilong_report import BabilongWriter
    from memlm.eval.babilong_scorer import get_metric

    score = get_metric(metric)
    w = BabilongWriter(out, prompt_cfg, metric, timestamp=timestamp, resume=True,
                       **{**writer_kwargs, "config": {**writer_kwargs.get("config", {}), "partial": True}})
    n = 0
    for task, length in cells:
        rows = w.existing(task, length)
        w.add_existing([{"task": task, "length": length, **r,
                         "correct": bool(score(r["target"], r["output"], r["question"], task))} for r in rows])
        n += len(rows)
    return w.finalize() if n else None


def make_generate_fn(lm, on_truncate=None):
    """prompt ids -> new ids with ``lm.generate`` (memory models stream the whole prompt through the memory).
    ``on_truncate(n_prompt_tokens)`` is called when a model without memory sees only the last
    model.max_seq_len tokens of a longer prompt."""
    max_len = int(lm.config.model.max_seq_len)

    def gen(ids: list[int], max_new_tokens: int) -> list[int]:
        if lm.stateless and len(ids) > max_len and on_truncate is not None:
            on_truncate(len(ids))
        return list(lm.generate(ids, max_new_tokens))

    return gen


def evaluate_babilong(lm, samples_by_cell: dict, out_dir: str | Path, *, prompt_config: str, metric: str,
                      max_new_tokens: int, state: dict, restart: bool = False, notes: dict | None = None,
                      progress: bool = True, model_name: str = "memlm") -> dict:
    """Run ``run_babilong`` with ``lm`` and resume / partial-result handling (module docstring)."""
    from memlm.eval.babilong import run_babilong

    out = Path(out_dir)
    resume, ts = _check_state(out, state, restart)
    if ts is None:
        from datetime import datetime

        ts = datetime.now().strftime("%Y-%m-%dT%H-%M-%S.%f")
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        _warn(f"resuming the evaluation in {out} (same run, step, prompt config, metric and samples); "
              "finished samples are kept (--restart discards them)")
    (out / STATE_FILE).write_text(json.dumps({**state, "timestamp": ts}, indent=2), encoding="utf-8")

    truncated = {"n": 0}

    def on_truncate(n: int) -> None:
        if truncated["n"] == 0:
            _warn(f"the model has no memory: prompts longer than model.max_seq_len="
                  f"{lm.config.model.max_seq_len} tokens are cut to their last tokens (first: {n} tokens)")
        truncated["n"] += 1

    writer_kwargs = {"model_name": model_name, "max_new_tokens": max_new_tokens,
                     "seed": (state.get("source") or {}).get("seed"),
                     "config": {"model_args": {"run": state.get("run"), "step": state.get("step")}, **(notes or {})}}
    cells = sorted(samples_by_cell)
    try:
        result = run_babilong(make_generate_fn(lm, on_truncate), lm.tokenizer, samples_by_cell, out,
                              prompt_config, metric=metric, max_new_tokens=max_new_tokens, progress=progress,
                              resume=resume, timestamp=ts, **{k: v for k, v in writer_kwargs.items()
                                                              if k != "max_new_tokens"})
    except BaseException:
        try:
            part = _finalize_partial(out, cells, prompt_config, metric, ts, writer_kwargs)
            if part is not None:
                _warn(f"stopped early: summaries of the {sum(v[1] for v in part['scores'].values())} samples "
                      f"done are in {out}; rerun the same command to resume")
        except Exception as e:  # never hide the original error
            _warn(f"could not write partial summaries ({type(e).__name__}: {e})")
        raise
    result["truncated_prompts"] = truncated["n"]
    return result


# ----------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------


def _load_model(run: str, step: int | None):
    from memlm import api

    return api.load(run, step)


def cmd_babilong(args) -> int:
    from memlm import config as config_lib
    from memlm.data.pipeline import get_tokenizer
    from memlm.eval.babilong_data import parse_length
    from memlm.eval.babilong_report import as_prompt_config, task_key
    from memlm.eval.babilong_scorer import get_metric

    tasks, lengths = parse_cells(args.tasks, args.lengths)
    cfg_name = as_prompt_config(args.prompt_config).name
    get_metric(args.metric)
    if args.samples is not None and args.samples < 1:
        raise UserError(f"--samples: must be >= 1, got {args.samples}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    check_output_dir(args.out, "--out")
    run_cfg = config_lib.read_run_config(args.run)
    model_tok = get_tokenizer(run_cfg.data)
    out = Path(args.out)
    notes: dict = {}
    if args.data:
        if not os.path.isdir(args.data):
            raise UserError(f"--data: {args.data} is not a directory")
        samples = collect_samples(tasks, lengths, data=args.data, samples=args.samples)
        source = {"kind": "data", "path": os.path.abspath(args.data), "samples": args.samples}
        notes["length_tokenizer"] = "gpt2 (as defined by the released data)"
    else:
        check_generate_inputs(tasks, lengths, args.books, args.books_split, args.babi_dir)
        len_tok, desc, fallback = length_tokenizer(args.gpt2_tokenizer, model_tok)
        if fallback:
            _warn(f"BABILong lengths: {desc}")
        notes["length_tokenizer"] = desc
        source = {"kind": "generate", "seed": args.seed, "samples": args.samples or 100,
                  "books": os.path.abspath(args.books) if args.books else None, "books_split": args.books_split,
                  "babi_dir": os.path.abspath(args.babi_dir) if args.babi_dir else None,
                  "length_tokenizer": getattr(len_tok, "fingerprint", getattr(len_tok, "name", "?"))}
        samples = None  # built after the state check (resume reuses the cached samples)
    notes["samples_source"] = source
    lm = _load_model(args.run, args.step)
    state = {"run": os.path.abspath(args.run), "step": int(lm.step), "prompt_config": cfg_name,
             "metric": args.metric, "max_new_tokens": args.max_new_tokens, "source": source}
    resume, _ = _check_state(out, state, args.restart)
    if samples is None:
        samples = collect_samples(tasks, lengths, samples=args.samples, books=args.books,
                                  books_split=args.books_split, seed=args.seed, tokenizer=len_tok,
                                  babi_dir=args.babi_dir, cache_dir=out / "generated", reuse_cache=resume,
                                  progress=not args.no_progress)
    if lm.stateless:
        notes["context_note"] = (f"model without memory: prompts longer than model.max_seq_len="
                                 f"{lm.config.model.max_seq_len} tokens keep only their last tokens")
    name = run_cfg.run.name or Path(os.path.abspath(args.run)).name
    try:
        result = evaluate_babilong(lm, samples, out, prompt_config=cfg_name, metric=args.metric,
                                   max_new_tokens=args.max_new_tokens, state=state, restart=args.restart,
                                   notes=notes, progress=not args.no_progress, model_name=name)
    except KeyboardInterrupt:
        print("memlm: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    rows = [{"task": t, "length": x, "acc": round(a, 2), "n": n}
            for (t, x), (a, n, _) in sorted(result["scores"].items(), key=lambda kv: (task_key(kv[0][0]),
                                                                                   parse_length(kv[0][1])))]
    print(json.dumps({"out": str(out), "metric": args.metric, "prompt_config": cfg_name,
                      "length_tokenizer": notes["length_tokenizer"], "truncated_prompts": result["truncated_prompts"],
                      "scores": rows, "files": {k: str(v) for k, v in result["paths"].items()}}, indent=2))
    return 0


def cmd_babilong_score(args) -> int:
    from memlm.eval.babilong_report import read_predictions_csv, rescore_predictions_csv

    task = args.task
    if task is None:
        m = re.match(r"(qa\d+)_", Path(args.predictions).name)
        if not m:
            raise UserError(f"--task: not given and {args.predictions} is not named {{task}}_{{length}}_...csv")
        task = m.group(1)
    acc = rescore_predictions_csv(args.predictions, task, args.metric)
    n = len(read_predictions_csv(args.predictions))
    print(f"{args.predictions}: task {task}, metric {args.metric}, {n} predictions; accuracy in %:")
    print(f"{acc:.4f}".rstrip("0").rstrip("."))
    return 0


def cmd_pg19(args) -> int:
    from memlm import config as config_lib
    from memlm.eval.pg19 import evaluate_pg19, read_pg19_split, validate_pg19_args

    validate_pg19_args(args.max_books, args.max_tokens_per_book, args.batch_size, args.stride, args.word_count)
    check_output_dir(args.out, "--out")
    read_pg19_split(args.data, args.split)  # bad input fails before the model loads
    run_cfg = config_lib.read_run_config(args.run)
    lm = _load_model(args.run, args.step)
    run_info = {"run": os.path.abspath(args.run), "step": int(lm.step), "model": run_cfg.model.kind}
    try:
        s = evaluate_pg19(lm, args.data, args.split, args.out, args.max_books, args.max_tokens_per_book,
                          args.batch_size, args.stride, args.word_count, args.restart, not args.no_progress,
                          run_info)
    except KeyboardInterrupt:
        print("memlm: interrupted; finished books are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    keys = ("dataset", "split", "books", "tokenizer", "scored_tokens", "words", "word_count_source", "bytes",
            "token_perplexity", "bits_per_token", "word_perplexity", "byte_perplexity", "bits_per_byte", "paths")
    print(json.dumps({k: s[k] for k in keys}, indent=2))
    return 0


def cmd_recall(args) -> int:
    from memlm import config as config_lib
    from memlm.eval.recall import recall_accuracy

    if args.docs < 1:
        raise UserError(f"--docs: {args.docs} is not a positive number of documents")
    if args.seed < 0:
        raise UserError(f"--seed: must be >= 0, got {args.seed}")
    if args.out:
        check_output_file(args.out, "--out", args.force)
    run_cfg = config_lib.read_run_config(args.run)
    if run_cfg.data.source != "assoc_recall":
        raise UserError(f"{os.path.join(args.run, 'config.yaml')}: data.source is {run_cfg.data.source!r}; "
                        "`memlm eval recall` scores runs trained with data.source=assoc_recall")
    lm = _load_model(args.run, args.step)
    result = {"run": os.path.abspath(args.run), "step": int(lm.step), "model": run_cfg.model.kind,
              **recall_accuracy(lm, n_docs=args.docs, split_seed=args.seed)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    """--run and --step, the trained run every evaluation reads."""
    parser.add_argument("--run", required=True, help="run directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")


def add_eval_commands(esub: argparse._SubParsersAction) -> None:
    """Register `babilong`, `babilong-score`, `pg19` and `recall` under `memlm eval`."""
    b = esub.add_parser(
        "babilong", help="BABILong accuracy by task and context length",
        description="Answer BABILong questions with greedy generation (the context streams through the "
                    "memory) and write the results JSON, per-sample JSONL, native CSVs, a task x length CSV, a "
                    "heatmap and an accuracy-vs-length plot to --out. Rerunning resumes.")
    _add_run_args(b)
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR", help="released BABILong data (data/qaN/LEN.json or parquet)")
    src.add_argument("--generate", action="store_true",
                     help="build samples: seeded bAbI qa1-qa5 facts hidden in --books text")
    b.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated (default {DEFAULT_TASKS})")
    b.add_argument("--lengths", default=DEFAULT_LENGTHS, help=f"comma-separated (default {DEFAULT_LENGTHS})")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--samples", type=int, default=None,
                   help="samples per cell (default: 100 generated / all released)")
    b.add_argument("--books", metavar="DIR", help="PG-19-layout background books for --generate")
    b.add_argument("--books-split", default="test", help="split of --books to draw from (default test, as upstream)")
    b.add_argument("--babi-dir", metavar="DIR", help="bAbI files qaN_*_train.txt (needed for qa6-qa20)")
    b.add_argument("--seed", type=int, default=0, help="sample seed for --generate (default 0)")
    b.add_argument("--prompt-config", default="finetuned",
                   help="finetuned (input + ' ' + question, the default for memory models) or "
                        "instruction_{yes|no}_examples_{yes|no}_post_prompt_{yes|no}[_chat_template_{yes|no}]")
    b.add_argument("--metric", default="babilong", choices=("babilong", "exact", "lm_eval", "legacy"),
                   help="babilong (leaderboard, default), exact (RMT/ARMT fine-tuning), lm_eval, legacy")
    b.add_argument("--max-new-tokens", type=int, default=20, help="greedy answer length (default 20)")
    b.add_argument("--gpt2-tokenizer", metavar="PATH",
                   help="GPT-2 tiktoken ranks file counting --generate lengths (default: the model's tokenizer)")
    b.add_argument("--restart", action="store_true", help="discard results already in --out")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_babilong)

    s = esub.add_parser("babilong-score", help="rescore a BABILong predictions CSV",
                        description="Accuracy (%) of a predictions CSV (columns target, output, question); "
                                    "the number is printed alone on the last line.")
    s.add_argument("--predictions", required=True, metavar="CSV")
    s.add_argument("--task", default=None, help="qaN (default: from the file name {task}_{length}_...csv)")
    s.add_argument("--metric", default="babilong", choices=("babilong", "exact", "lm_eval", "legacy"))
    s.set_defaults(func=cmd_babilong_score)

    p = esub.add_parser(
        "pg19", help="PG-19 token / word / byte perplexity and perplexity by segment index",
        description="Stream every book of a PG-19-layout split through the model (fresh memory per book) and "
                    "write pg19_SPLIT.json (token, word and byte perplexity, bits per byte, perplexity by "
                    "segment index), a per-book JSONL and a plot to --out. Rerunning resumes.")
    _add_run_args(p)
    p.add_argument("--data", required=True, metavar="PG19_DIR", help="metadata.csv + train/ validation/ test/")
    p.add_argument("--split", default="validation", choices=("validation", "test"))
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max-books", type=int, default=None, help="only the first N books (by id)")
    p.add_argument("--max-tokens-per-book", type=int, default=None, help="cut books to their first N tokens")
    p.add_argument("--batch-size", type=int, default=1, help="books (or windows) per model call (default 1)")
    p.add_argument("--stride", type=int, default=None,
                   help="models without memory: slide windows of model.max_seq_len by this many tokens "
                        "(default: non-overlapping windows)")
    p.add_argument("--word-count", default="auto", choices=("auto", "official", "whitespace"),
                   help="auto: official PG-19 totals for the whole official split, else whitespace words")
    p.add_argument("--restart", action="store_true", help="discard results already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pg19)

    r = esub.add_parser(
        "recall", help="associative-recall answer accuracy (runs trained with data.source=assoc_recall)",
        description="Greedy answer accuracy on held-out recall documents of the run's own shape (segments, pairs), "
                    "streamed segment by segment, every pair beyond the attention window (data.recall_in_window "
                    "is a training curriculum only). Prints overall and per-answer accuracy and chance.")
    _add_run_args(r)
    r.add_argument("--docs", type=int, default=512, help="held-out documents (default 512)")
    r.add_argument("--seed", type=int, default=1, help="held-out document seed (default 1; training uses 0)")
    r.add_argument("--out", default=None, help="also write the result JSON here (a new file)")
    r.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    r.set_defaults(func=cmd_recall)
