"""BABILong fine-tuning data for `memlm train` (benchmarks.md §1.2, "Fine-tuned memory models"): generated
samples as training documents, the loss only on the answer, and a curriculum over lengths.

Document layout (the input the evaluation's "finetuned" prompt config feeds, so training and
``memlm eval babilong --prompt-config finetuned --metric exact`` agree token for token):

    tokens    = encode(input + " " + question) + encode(target) + [eos]          int32 [n]
    loss_mask = 1 on the targets j (predicting tokens[j+1]) that are answer tokens or the eos,
                0 elsewhere                                                       float32 [n - 1]

(RMT's ``run_finetuning_babilong_rmt.py`` puts a [GEN] token between question and answer and masks the last
len(target) + 2 positions; memlm has no [GEN] token, the prompt itself ends the context.)

Sample separation: training samples use bAbI stories from the generator with seed ``seed`` (default 1; the
evaluation uses ``--seed 0``) and background sentences from the PG-19 **train** split (evaluation: test).
Different seeds do not make the stories disjoint where a task's story space is small: for qa4 (3 locations, 2
directions) 49 of 100 seed-0 evaluation samples have the facts, question and answer of one of 5,000 seed-1
training samples (qa1: 1 of 500, qa5: 0 of 500; session 17 audit). Their background text differs. Upstream
shares this: its test sets are built from bAbI's train files.

Pieces:
  * ``BabilongTrainCorpus``: Corpus-like (``num_docs``, ``doc(i)``, ``doc_lengths``, ``total_tokens``,
    ``name``, ``pad_id``, ``eos_id``) plus ``doc_loss_mask(i)`` float32 [len_i - 1] and ``doc_length_name``.
  * ``SampleBatcher``: one whole sample per batch row, [B, n_segments, segment_len], reset at segment 0, the
    masks applied, ``state()``/``restore()`` like memlm.data.batcher.SegmentBatcher. A sample must fit
    n_segments * segment_len (so the memory sees the whole context and the answer in one BPTT window).
  * ``curriculum``: stages of increasing length (each stage trains on its length and all shorter ones, as the
    RMT/ARMT curricula do), with the n_segments each stage needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from memlm.errors import UserError

STATE_VERSION = 1


def encode_sample(record: dict, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [n], loss_mask float32 [n - 1]) of one record {input, question, target}."""
    from memlm.eval.prompts import finetuned_input

    prompt = list(tokenizer.encode(finetuned_input(record["input"], record["question"])))
    answer = list(tokenizer.encode(record["target"])) + [int(tokenizer.eos_id)]
    if not prompt:
        raise UserError("babilong sample: empty prompt")
    tokens = np.asarray(prompt + answer, np.int32)
    mask = np.zeros(tokens.size - 1, np.float32)
    mask[len(prompt) - 1 :] = 1.0  # targets tokens[len(prompt):] = the answer and the eos
    return tokens, mask


class BabilongTrainCorpus:
    """BABILong samples as training documents with per-target loss masks (module docstring)."""

    def __init__(self, records: Sequence[tuple[str, str, dict]], tokenizer, name: str = "babilong-train"):
        """records: (task, length, {input, question, target}) triples."""
        if not records:
            raise UserError("babilong training data: no samples")
        self.name = name
        self.pad_id = int(getattr(tokenizer, "pad_id", 0) or 0)
        self.eos_id = int(tokenizer.eos_id)
        self._docs, self._masks = [], []
        self.doc_task, self.doc_length_name = [], []
        for task, length, rec in records:
            t, m = encode_sample(rec, tokenizer)
            self._docs.append(t)
            self._masks.append(m)
            self.doc_task.append(task)
            self.doc_length_name.append(length)
        self.doc_lengths = np.asarray([d.size for d in self._docs], np.int64)

    @property
    def num_docs(self) -> int:
        return len(self._docs)

    @property
    def total_tokens(self) -> int:
        return int(self.doc_lengths.sum())

    def doc(self, i: int) -> np.ndarray:
        return self._docs[i]

    def doc_loss_mask(self, i: int) -> np.ndarray:
        """float32 [len(doc(i)) - 1]: 1 where the target (doc[j + 1]) is part of the answer or the eos."""
        return self._masks[i]

    def subset(self, lengths: Sequence[str]) -> BabilongTrainCorpus:
        """The documents whose BABILong length is in ``lengths`` (a curriculum stage)."""
        keep = [i for i in range(self.num_docs) if self.doc_length_name[i] in set(lengths)]
        if not keep:
            raise UserError(f"babilong training data: no samples at lengths {', '.join(lengths)}")
        new = object.__new__(BabilongTrainCorpus)
        new.name, new.pad_id, new.eos_id = f"{self.name}[{','.join(lengths)}]", self.pad_id, self.eos_id
        new._docs, new._masks = [self._docs[i] for i in keep], [self._masks[i] for i in keep]
        new.doc_task = [self.doc_task[i] for i in keep]
        new.doc_length_name = [self.doc_length_name[i] for i in keep]
        new.doc_lengths = self.doc_lengths[keep]
        return new


def build_train_corpus(tasks: Sequence[str], lengths: Sequence[str], samples_per_cell: int, books_dir: str | None,
                       tokenizer, length_tokenizer=None, seed: int = 1, books_split: str = "train",
                       cache_dir: str | Path | None = None) -> BabilongTrainCorpus:
    """Generate ``samples_per_cell`` samples per (task, length) (memlm.eval.babilong_data.build_dataset, lengths
    counted by ``length_tokenizer`` or, if None, ``tokenizer``), cached in the released layout under
    ``cache_dir`` when given, and encode them with the model's ``tokenizer``."""
    from memlm.eval.commands import collect_samples, parse_cells

    try:
        tasks, lengths = parse_cells(",".join(tasks), ",".join(lengths))
    except UserError as e:  # parse_cells names the eval command's flags; here they are config keys
        msg = str(e).replace("--tasks:", "data.babilong.tasks:").replace("--lengths:", "data.babilong.lengths:")
        raise UserError(msg) from None
    cells = collect_samples(tasks, lengths, samples=samples_per_cell, books=books_dir, books_split=books_split,
                            seed=seed, tokenizer=length_tokenizer or tokenizer, cache_dir=cache_dir,
                            reuse_cache=cache_dir is not None, progress=False)
    records = [(t, x, r) for (t, x), recs in sorted(cells.items()) for r in recs]
    return BabilongTrainCorpus(records, tokenizer, name=f"babilong-train:{','.join(tasks)}:{','.join(lengths)}")


def curriculum(corpus: BabilongTrainCorpus, segment_len: int, steps_per_stage: int) -> list[dict]:
    """Stages over the corpus's lengths, shortest first: stage k trains on lengths[:k+1] for steps_per_stage
    steps with n_segments = ceil(longest document of the stage / segment_len).

    Returns [{"stage", "lengths", "n_segments", "start_step", "end_step"}].
    """
    from memlm.eval.babilong_data import parse_length

    if segment_len < 1 or steps_per_stage < 1:
        raise UserError("curriculum: segment_len and steps_per_stage must be >= 1")
    order = sorted(set(corpus.doc_length_name), key=parse_length)
    stages = []
    for k in range(len(order)):
        active = order[: k + 1]
        longest = int(max(corpus.doc_lengths[i] for i in range(corpus.num_docs)
                          if corpus.doc_length_name[i] in active))
        stages.append({"stage": k, "lengths": active, "n_segments": math.ceil((longest - 1) / segment_len),
                       "start_step": k * steps_per_stage, "end_step": (k + 1) * steps_per_stage})
    return stages


class SampleBatcher:
    """One whole sample per row: tokens/targets/loss_mask/positions [B, n_segments, segment_len], reset [B, S].

    Row b (global slot s) reads the permutation np.random.default_rng([seed, s, epoch]) of the documents, one
    document per batch; the last segments are padded (loss_mask 0). The same arrays as SegmentBatcher, so
    the train step needs no change; ``loss_mask`` is the document's answer mask.
    """

    def __init__(self, corpus: BabilongTrainCorpus, global_batch: int, n_segments: int, segment_len: int,
                 seed: int, slots: Sequence[int] | None = None):
        self.corpus, self.n_segments, self.segment_len, self.seed = corpus, int(n_segments), int(segment_len), seed
        self.slots = list(range(global_batch)) if slots is None else [int(s) for s in slots]
        longest = int(corpus.doc_lengths.max()) - 1
        if longest > self.n_segments * self.segment_len:
            raise UserError(f"data.n_segments: a BABILong sample has {longest} inputs, more than n_segments * "
                            f"segment_len = {self.n_segments} * {self.segment_len}; raise data.n_segments to "
                            f"{math.ceil(longest / self.segment_len)}")
        self._pos = {s: [0, 0] for s in self.slots}  # slot -> [epoch, index]

    def _doc_index(self, slot: int) -> int:
        epoch, idx = self._pos[slot]
        if idx >= self.corpus.num_docs:
            epoch, idx = epoch + 1, 0
        self._pos[slot] = [epoch, idx + 1]
        return int(np.random.default_rng([self.seed, slot, epoch]).permutation(self.corpus.num_docs)[idx])

    def next(self, n_segments: int | None = None) -> dict[str, np.ndarray]:
        if n_segments not in (None, self.n_segments):
            raise UserError("data.vary_n_segments is not supported with data.source=babilong")
        B, S, L = len(self.slots), self.n_segments, self.segment_len
        shape = (B, S * L)
        out = {"tokens": np.full(shape, self.corpus.pad_id, np.int32),
               "targets": np.full(shape, self.corpus.pad_id, np.int32),
               "loss_mask": np.zeros(shape, np.float32),
               "positions": np.broadcast_to(np.arange(S * L, dtype=np.int32), shape).copy()}
        for b, slot in enumerate(self.slots):
            d = self._doc_index(slot)
            doc, m = self.corpus.doc(d), self.corpus.doc_loss_mask(d)
            n = doc.size - 1
            out["tokens"][b, :n] = doc[:-1]
            out["targets"][b, :n] = doc[1:]
            out["loss_mask"][b, :n] = m
        batch = {k: v.reshape(B, S, L) for k, v in out.items()}
        batch["reset"] = np.zeros((B, S), bool)
        batch["reset"][:, 0] = True
        return batch

    def __next__(self) -> dict[str, np.ndarray]:
        return self.next()

    def __iter__(self):
        return self

    def state(self) -> dict:
        return {"version": STATE_VERSION, "kind": "babilong_samples", "seed": self.seed,
                "num_docs": self.corpus.num_docs,
                "slots": {str(s): {"epoch": p[0], "index": p[1]} for s, p in self._pos.items()}}

    def restore(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or state.get("kind") != "babilong_samples":
            raise ValueError("it is not a data.source=babilong position (whole samples); give the run its own "
                             "run.dir")
        for key in ("seed", "num_docs"):
            if int(state[key]) != (self.seed if key == "seed" else self.corpus.num_docs):
                raise ValueError(f"batcher state: {key} {state[key]} differs from this batcher's")
        for s in self.slots:
            p = state["slots"][str(s)]
            self._pos[s] = [int(p["epoch"]), int(p["index"])]
