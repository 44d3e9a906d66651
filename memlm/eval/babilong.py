"""BABILong evaluation loop (benchmarks.md §1.3-1.5): prompt -> greedy generation -> score -> result files.

The model is abstracted as ``generate_fn(prompt_token_ids: list[int], max_new_tokens: int) -> list[int]``
(the new tokens only), so this module needs no JAX; the CLI wraps a model's ``.generate``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from memlm.errors import UserError
from memlm.eval.babilong_data import parse_length
from memlm.eval.babilong_report import BabilongWriter, as_prompt_config, task_key
from memlm.eval.babilong_scorer import check_task, get_metric
from memlm.eval.prompts import PromptConfig

GenerateFn = Callable[[list[int], int], list[int]]


def _cut_at_eos(ids: list[int], eos_id: Any) -> list[int]:
    if isinstance(eos_id, int) and eos_id >= 0 and eos_id in ids:
        return ids[: ids.index(eos_id)]
    return ids


def run_babilong(
    generate_fn: GenerateFn,
    tokenizer: Any,
    samples_by_cell: dict[tuple[str, str], list[dict]],
    out_dir: str | Path,
    prompt_cfg: PromptConfig | str | dict,
    metric: str = "babilong",
    max_new_tokens: int = 20,
    progress: bool = True,
    model_name: str = "memlm",
    resume: bool = False,
    store_inputs: bool = False,
    seed: int | None = None,
    timestamp: str | None = None,
    config: dict | None = None,
) -> dict:
    """Evaluate every (task, length) cell and write all BABILong outputs to ``out_dir``.

    Args:
      generate_fn: greedy generation, prompt ids -> new ids (an EOS, if the tokenizer has ``eos_id``, ends
        the answer).
      tokenizer: anything with ``encode(text) -> list[int]`` and ``decode(ids) -> str``.
      samples_by_cell: (task, length) -> records ``{input, question, target}``.
      prompt_cfg: a ``PromptConfig``, its name, or a dict of its fields; "finetuned" means the prompt is
        input + " " + question.
      metric: babilong | legacy | lm_eval | exact (see ``babilong_scorer``).
      resume: keep samples already in the native CSVs of ``out_dir`` (same prompt config) and skip them.
    Returns:
      {"scores": {(task, length): (accuracy %, n, stderr %)}, "paths": {kind: Path}}.
    """
    cfg = as_prompt_config(prompt_cfg)
    score = get_metric(metric)
    for task, length in samples_by_cell:
        check_task(task)
        parse_length(length)
    writer = BabilongWriter(
        out_dir,
        cfg,
        metric,
        model_name=model_name,
        timestamp=timestamp,
        max_new_tokens=max_new_tokens,
        store_inputs=store_inputs,
        resume=resume,
        seed=seed,
        config=config,
    )
    cells = sorted(samples_by_cell, key=lambda c: (task_key(c[0]), parse_length(c[1])))
    total = sum(len(samples_by_cell[c]) for c in cells)
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=total, desc="babilong", unit="sample")
    eos_id = getattr(tokenizer, "eos_id", None)
    try:
        for task, length in cells:
            records = samples_by_cell[(task, length)]
            done = writer.existing(task, length) if resume else []
            if len(done) > len(records):
                raise UserError(
                    f"{writer.native_csv(task, length)}: {len(done)} saved rows but only "
                    f"{len(records)} samples"
                )
            for i, row in enumerate(done):
                if (row["target"], row["question"]) != (records[i]["target"], records[i]["question"]):
                    raise UserError(
                        f"{writer.native_csv(task, length)}: row {i + 1} does not match sample {i}; "
                        "resume needs the same samples in the same order"
                    )
            writer.add_existing(
                [
                    {
                        "task": task,
                        "length": length,
                        **row,
                        "correct": score(row["target"], row["output"], row["question"], task),
                    }
                    for row in done
                ]
            )
            n_ok = sum(bool(score(r["target"], r["output"], r["question"], task)) for r in done)
            if pbar is not None:
                pbar.update(len(done))
            for i in range(len(done), len(records)):
                rec = records[i]
                prompt = cfg.format(task, rec["input"], rec["question"])
                new_ids = _cut_at_eos(
                    list(generate_fn(list(tokenizer.encode(prompt)), max_new_tokens)), eos_id
                )
                output = tokenizer.decode(new_ids)
                correct = bool(score(rec["target"], output, rec["question"], task))
                n_ok += correct
                writer.add(
                    {
                        "task": task,
                        "length": length,
                        "target": rec["target"],
                        "output": output,
                        "question": rec["question"],
                        "correct": correct,
                        "input": rec["input"],
                    }
                )
                if pbar is not None:
                    pbar.update(1)
                    pbar.set_postfix_str(f"{task}/{length} acc {100.0 * n_ok / (i + 1):.1f}%")
    finally:
        if pbar is not None:
            pbar.close()
    return writer.finalize()
