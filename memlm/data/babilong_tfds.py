"""BABILong (Kuratov et al. 2024, arXiv 2406.10149) as a TFDS dataset and seqio tasks, over local files.

Imports tensorflow / tensorflow_datasets / seqio: import this module lazily (memlm.data.cli does).

* ``LocalBabilong`` -- TFDS builder ``local_babilong``. One builder config per bAbI task (``qa1`` .. ``qa20``),
  one split per BABILong length present for that task (released names: ``0k 1k 2k 4k ... 512k 1M 10M``), so
  ``tfds.builder("local_babilong/qa2", data_dir=D).as_dataset(split="4k")`` is HF's
  ``load_dataset("RMT-team/babilong", "4k")["qa2"]`` (benchmarks.md §1.1: there the config is the length and
  the split the task; TFDS needs a fixed config list, and the tasks are fixed while the lengths are not).
  Features: ``input``, ``question``, ``target`` (text, as released: the question keeps its trailing space),
  ``task``, ``length`` (text) and ``index`` (int32, the record's position in the released file). Records
  keep file order (``disable_shuffling``).
  The BABILong directory is the manual dir; either released layout is read, by the one parser
  ``memlm.eval.babilong_data.load_babilong_dir`` (``data/qa{N}/{len}.json`` of RMT-team/babilong, or the
  ``{len}/qa{N}-*.parquet`` shards of RMT-team/babilong-1k-samples; see its docstring for all variants).
* ``prepare_babilong`` -- generate the configs present in a directory into a TFDS data dir.
* ``register_babilong_tasks`` -- one seqio Task per (task, length), named by ``babilong_task_name``
  (``memlm_babilong_qa1_4k_<hash>_<tokenizer>``). Preprocessor: the prompt of memlm.eval.prompts
  (default "finetuned": ``input + " " + question``, as ``memlm eval babilong --prompt-config finetuned``
  and memlm.eval.babilong_finetune feed it) -> "inputs", the answer -> "targets"; both tokenized with a
  memlm Tokenizer (``TokenizerVocabulary``), eos appended to "targets" only. So the concatenation
  inputs + targets is exactly ``babilong_finetune.encode_sample``'s token sequence, and
  ``seqio.PrefixLMFeatureConverter`` yields its loss mask.

Import direction: memlm.data.babilong_tfds -> memlm.eval.{babilong_data, babilong_scorer, prompts}; none of
those imports memlm.data, so there is no cycle (memlm.eval.babilong_data stays free of tensorflow).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
from pathlib import Path

import numpy as np

# seqio, tensorflow and tfds come through seqio_tasks, which imports tensorflow with its native notices silenced
from memlm.data.seqio_tasks import LocalTfdsDataSource, TokenizerVocabulary, seqio, tf, tfds, tfds_prepare_lock
from memlm.data.tokenizers import Tokenizer, fingerprint_of
from memlm.errors import UserError
from memlm.eval.babilong_data import LENGTHS, load_babilong_dir, parse_length
from memlm.eval.babilong_scorer import TASK_LABELS, check_task
from memlm.eval.prompts import PromptConfig, parse_prompt_config_name

BABILONG_TFDS_NAME = "local_babilong"
BABILONG_TFDS_VERSION = "1.0.0"
TASKS = tuple(sorted(TASK_LABELS, key=lambda t: int(t[2:])))  # qa1 .. qa20
_REGISTERED: dict[str, tuple] = {}

__all__ = [
    "BABILONG_TFDS_NAME",
    "LocalBabilong",
    "babilong_task_name",
    "find_babilong_cells",
    "prepare_babilong",
    "register_babilong_tasks",
]


# ----------------------------------------------------------------------------------------------------------
# Which (task, length) cells a local BABILong directory holds
# ----------------------------------------------------------------------------------------------------------


def source_fingerprint(root: str | os.PathLike) -> str:
    """Digest of (path, size, mtime) of every .json / .parquet file under root: a prepared TFDS copy records
    it, so a source changed after preparation is detected instead of silently served stale."""
    entries = sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in Path(root).rglob("*") if p.is_file() and p.suffix in (".json", ".parquet"))
    return hashlib.sha256(repr(entries).encode()).hexdigest()[:16]


def find_babilong_cells(root: str | os.PathLike) -> dict[str, list[str]]:
    """{task: [length, ...]} of the cells in a local BABILong directory (either layout, with or without
    the ``data/`` level), tasks in qa order, lengths shortest first.

    Only looks at names; the records are read (and checked) by ``load_babilong_dir``. A data file whose
    name is not a BABILong length / task (e.g. ``data/qa1/3k.json``) raises UserError naming it, so no
    data is silently left out.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: BABILong directory not found")
    found: dict[str, set[str]] = {}
    for base in (root / "data", root):
        if not base.is_dir():
            continue
        for d in sorted(p for p in base.iterdir() if p.is_dir()):
            if d.name in TASK_LABELS:  # RMT-team/babilong: {task}/{length}.json (or .parquet)
                for f in sorted(d.iterdir()):
                    if f.is_file() and f.suffix in (".json", ".parquet"):
                        if f.stem not in LENGTHS:
                            raise UserError(f"{f}: '{f.stem}' is not a BABILong length ({', '.join(LENGTHS)})")
                        found.setdefault(d.name, set()).add(f.stem)
            elif d.name in LENGTHS:  # babilong-1k-samples: {length}/{task}-*.parquet or {length}/{task}/*.parquet
                for f in sorted(d.iterdir()):
                    if f.is_file() and f.suffix == ".parquet":
                        task = f.name.split("-", 1)[0]
                        if task not in TASK_LABELS or "-" not in f.name:
                            raise UserError(f"{f}: parquet shards must be named {{task}}-*.parquet, task qa1..qa20")
                        found.setdefault(task, set()).add(d.name)
                    elif f.is_dir() and f.name in TASK_LABELS and any(f.glob("*.parquet")):
                        found.setdefault(f.name, set()).add(d.name)
    if not found:
        raise UserError(
            f"{root}: no BABILong data (expected data/qa{{N}}/{{len}}.json or {{len}}/qa{{N}}-*.parquet)"
        )
    return {t: sorted(found[t], key=parse_length) for t in sorted(found, key=lambda t: int(t[2:]))}


# ----------------------------------------------------------------------------------------------------------
# TFDS builder
# ----------------------------------------------------------------------------------------------------------


class LocalBabilong(tfds.core.GeneratorBasedBuilder):
    """Local BABILong: config = task (qa1..qa20), split = length ("0k", "1k", ..., "1M"); see module doc.

    Registered as "local_babilong" (TFDS derives the name from the class name).
    """

    VERSION = tfds.core.Version(BABILONG_TFDS_VERSION)
    RELEASE_NOTES = {BABILONG_TFDS_VERSION: "BABILong from a local directory; config = task, split = length."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=t, description=f"BABILong {t}, every length") for t in TASKS]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass a local BABILong directory (RMT-team/babilong: data/qa{N}/{len}.json, or "
        "RMT-team/babilong-1k-samples: {len}/qa{N}-*.parquet) as download_config.manual_dir."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "input": tfds.features.Text(),
                    "question": tfds.features.Text(),
                    "target": tfds.features.Text(),
                    "task": tfds.features.Text(),
                    "length": tfds.features.Text(),
                    "index": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            supervised_keys=None,
            homepage="https://github.com/booydar/babilong",
            # Why: keep the released order, so record i of the split is record i of the file.
            disable_shuffling=True,
            # The source directory is recorded, so a data dir prepared from another copy is detected.
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = os.path.abspath(os.fspath(dl_manager.manual_dir))
        task = self.builder_config.name
        # Validate the names eagerly so a bad tree fails before TFDS starts writing.
        cells = find_babilong_cells(root)
        if task not in cells:
            raise UserError(f"{root}: no BABILong data for {task} (the directory has {', '.join(cells)})")
        self.info.metadata["source_dir"] = root
        self.info.metadata["source_fingerprint"] = source_fingerprint(root)
        return {length: self._generate_examples(root, task, length) for length in cells[task]}

    def _generate_examples(self, root: str, task: str, length: str):
        # One parser: the eval reader checks every record and names the file when one is malformed.
        for i, rec in enumerate(load_babilong_dir(root, task, length)):
            yield i, {**rec, "task": task, "length": length, "index": i}


def prepare_babilong(
    data_dir: str | os.PathLike, tfds_data_dir: str | os.PathLike, tasks: list[str] | None = None
) -> dict[str, dict[str, int]]:
    """Generate ``local_babilong/<task>`` for every task in ``data_dir`` (or just ``tasks``) into
    ``tfds_data_dir``; an already prepared config is reused. Returns {task: {length: n_records}}.

    Raises UserError for a malformed file (naming it), a task without data, or a config that
    ``tfds_data_dir`` already holds from a different BABILong directory.
    """
    root = os.path.abspath(os.fspath(data_dir))
    cells = find_babilong_cells(root)
    for t in tasks or ():
        check_task(t)
        if t not in cells:
            raise UserError(f"{root}: no BABILong data for {t} (the directory has {', '.join(cells)})")
    out: dict[str, dict[str, int]] = {}
    tfds_root = os.path.abspath(os.fspath(tfds_data_dir))
    for task in tasks or list(cells):
        name = f"{BABILONG_TFDS_NAME}/{task}:{BABILONG_TFDS_VERSION}"
        with tfds_prepare_lock(tfds_root):  # one preparing process at a time (seqio_tasks.tfds_prepare_lock)
            builder = tfds.builder(name, data_dir=tfds_root)
            if builder.is_prepared():
                src = builder.info.metadata.get("source_dir") if builder.info.metadata else None
                if src != root:
                    raise UserError(
                        f"{builder.data_dir}: {BABILONG_TFDS_NAME}/{task} was prepared from {src}, not {root}; "
                        "use another TFDS directory"
                    )
                if builder.info.metadata.get("source_fingerprint") != source_fingerprint(root):
                    raise UserError(f"{root}: its files changed since {BABILONG_TFDS_NAME}/{task} was prepared "
                                    f"into {builder.data_dir}; delete that directory or use another TFDS directory")
            # TFDS prints its "Downloading and preparing" banner to stdout; keep stdout for results.
            with contextlib.redirect_stdout(sys.stderr):
                builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(
                        manual_dir=root, compute_stats=tfds.download.ComputeStatsMode.SKIP
                    )
                )
        out[task] = {s: builder.info.splits[s].num_examples for s in cells[task]}
    return out


# ----------------------------------------------------------------------------------------------------------
# seqio tasks
# ----------------------------------------------------------------------------------------------------------


def _as_prompt_config(prompt_config: PromptConfig | str) -> PromptConfig:
    return prompt_config if isinstance(prompt_config, PromptConfig) else parse_prompt_config_name(prompt_config)


def babilong_task_name(
    task: str, length: str, data_dir: str | os.PathLike, tokenizer: Tokenizer,
    prompt_config: PromptConfig | str = "finetuned",
) -> str:
    """``memlm_babilong_{task}_{length}_{hash}_{tokenizer}``; hash = 12 hex of (abs data_dir, prompt config)."""
    cfg = _as_prompt_config(prompt_config)
    key = f"{os.path.abspath(os.fspath(data_dir))}\0{cfg.name}\0{cfg.chat_template!r}"
    tok = re.sub(r"[^A-Za-z0-9_]", "_", fingerprint_of(tokenizer))
    return f"memlm_babilong_{task}_{length}_{hashlib.sha256(key.encode()).hexdigest()[:12]}_{tok}"


def _prompt_preprocessor(task: str, cfg: PromptConfig):
    """TFDS record -> {"inputs": prompt text, "targets": answer text, task, length, index}.

    The prompt is built by memlm.eval.prompts in Python (tf.py_function) so that it is the very text
    ``memlm eval babilong`` feeds the model.
    """

    def make_prompt(inp: tf.Tensor, question: tf.Tensor) -> bytes:
        return cfg.format(task, inp.numpy().decode("utf-8"), question.numpy().decode("utf-8")).encode("utf-8")

    def fn(ex):
        prompt = tf.py_function(make_prompt, [ex["input"], ex["question"]], tf.string)
        prompt.set_shape([])
        return {
            "inputs": prompt,
            "targets": ex["target"],
            "task": ex["task"],
            "length": ex["length"],
            "index": ex["index"],
        }

    def preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
        return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    return preprocess


def register_babilong_tasks(
    data_dir: str | os.PathLike,
    tokenizer: Tokenizer,
    tfds_data_dir: str | os.PathLike,
    prompt_config: PromptConfig | str = "finetuned",
    tasks: list[str] | None = None,
    lengths: list[str] | None = None,
    split: str = "test",
    prepare: bool = True,
) -> dict[tuple[str, str], str]:
    """Register one seqio Task per (task, length) cell of ``data_dir``; returns {(task, length): name}.

    Each Task reads ``local_babilong/<task>`` split ``<length>`` from ``tfds_data_dir`` and exposes it as
    the seqio split ``split`` ("test": the released BABILong sets are evaluation data). ``prepare``
    generates the TFDS data first (a no-op when present). Output features: "inputs" (prompt ids, no eos)
    and "targets" (answer ids + eos), int32 [n]; "*_pretokenized" keep the text.
    """
    cfg = _as_prompt_config(prompt_config)
    root = os.path.abspath(os.fspath(data_dir))
    tfds_data_dir = os.path.abspath(os.fspath(tfds_data_dir))
    cells = find_babilong_cells(root)
    wanted: list[tuple[str, str]] = []
    for t in tasks or list(cells):
        check_task(t)
        if t not in cells:
            raise UserError(f"{root}: no BABILong data for {t} (the directory has {', '.join(cells)})")
        for x in lengths or cells[t]:
            if x not in cells[t]:
                raise UserError(f"{root}: no BABILong data for {t} at {x} ({t} has {', '.join(cells[t])})")
            wanted.append((t, x))
    if prepare:
        prepare_babilong(root, tfds_data_dir, sorted({t for t, _ in wanted}, key=lambda t: int(t[2:])))
    vocab = TokenizerVocabulary(tokenizer)
    names: dict[tuple[str, str], str] = {}
    for t, x in wanted:
        name = babilong_task_name(t, x, root, tokenizer, cfg)
        key = (root, fingerprint_of(tokenizer), cfg, tfds_data_dir, split)
        names[(t, x)] = name
        if name in seqio.TaskRegistry.names():
            if _REGISTERED.get(name) == key:
                continue
            seqio.TaskRegistry.remove(name)
        source = LocalTfdsDataSource(
            {split: seqio.utils.TfdsSplit(
                dataset=f"{BABILONG_TFDS_NAME}/{t}:{BABILONG_TFDS_VERSION}", split=x, data_dir=tfds_data_dir
            )}
        )
        seqio.TaskRegistry.add(
            name,
            source=source,
            preprocessors=[_prompt_preprocessor(t, cfg), seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
            output_features={
                "inputs": seqio.Feature(vocabulary=vocab, add_eos=False, dtype=tf.int32),
                "targets": seqio.Feature(vocabulary=vocab, add_eos=True, dtype=tf.int32),
            },
        )
        _REGISTERED[name] = key
    return names
