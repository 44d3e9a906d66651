"""From a run config to tokenizer, corpora and batchers (the glue the trainer and evaluators call)."""

from __future__ import annotations

import logging
import os

from memlm.errors import UserError

GENERATED_SPLITS = ("train", "validation", "test")  # the generated sources' splits (each its own seed)


def get_tokenizer(data_cfg):
    from memlm.data.tokenizers import load_tokenizer

    return load_tokenizer(data_cfg.tokenizer, data_cfg.tokenizer_path)


def _babilong_cache_dir(d, split: str, seed: int, books_split: str, length_tokenizer) -> str:
    """Where generated BABILong training cells are cached: one directory per everything that decides their
    content (generator version, seed, samples per cell, books, length tokenizer), so changing any of them
    generates anew instead of reusing other samples."""
    from memlm.data.corpus import _digest  # the corpus cache's key: the same hashing for the same purpose
    from memlm.data.tokenizers import fingerprint_of
    from memlm.eval.babilong_data import GENERATOR_VERSION

    key = _digest([GENERATOR_VERSION, seed, d.babilong.samples_per_cell, os.path.abspath(d.path), books_split,
                   fingerprint_of(length_tokenizer)])
    return os.path.join(d.cache_dir or os.path.join(d.path, ".memlm_cache"), f"babilong-{split}-{key}")


def get_corpus(cfg, split: str, tokenizer):
    """The tokenized corpus for `split` of the configured source."""
    d = cfg.data
    if d.source in ("synthetic", "assoc_recall", "babilong") and split not in GENERATED_SPLITS:
        raise UserError(f"data split {split!r} does not exist: data.source={d.source} generates "
                        f"{', '.join(GENERATED_SPLITS)}")
    if d.source == "synthetic":
        from memlm.data.synthetic import SyntheticCorpus

        seed = GENERATED_SPLITS.index(split)
        return SyntheticCorpus(cfg.model.vocab_size, n_docs=d.synthetic_docs, min_len=d.segment_len,
                               max_len=4 * d.segment_len * d.n_segments, seed=seed, eos_id=tokenizer.eos_id)
    if d.source == "assoc_recall":
        from memlm.data.synthetic import AssociativeRecallCorpus

        seed = GENERATED_SPLITS.index(split)
        in_window = d.recall_in_window if split == "train" else 0.0
        try:
            corpus = AssociativeRecallCorpus(d.synthetic_docs, d.n_segments, d.segment_len,
                                             num_pairs=d.recall_pairs, seed=seed, in_window=in_window)
        except ValueError as e:  # the document does not fit the segments: name the config keys involved
            raise UserError(f"data.recall_pairs={d.recall_pairs}, data.recall_in_window={in_window}, "
                            f"data.segment_len={d.segment_len}, data.n_segments={d.n_segments}: {e}") from None
        if corpus.vocab_needed > cfg.model.vocab_size:
            raise UserError(f"model.vocab_size={cfg.model.vocab_size} < {corpus.vocab_needed} needed by assoc_recall")
        return corpus
    if d.source == "babilong":
        from memlm.eval.babilong_finetune import build_train_corpus

        if not os.path.isdir(d.path):
            raise UserError(f"data.path: directory {d.path!r} does not exist (books for BABILong background text)")
        length_tok = None
        if d.babilong.gpt2_tokenizer:
            from memlm.data.tokenizers import load_tokenizer

            length_tok = load_tokenizer("gpt2", d.babilong.gpt2_tokenizer)
        elif tokenizer.name != "gpt2":
            logging.getLogger(__name__).warning(
                "data.babilong.gpt2_tokenizer is not set: sample lengths (%s) count %s tokens, not GPT-2 tokens as "
                "BABILong's do", ", ".join(d.babilong.lengths), tokenizer.name)
        b = d.babilong
        seed, books_split = b.seed + (0 if split == "train" else 1000), "train" if split == "train" else "validation"
        return build_train_corpus(b.tasks, b.lengths, b.samples_per_cell, d.path, tokenizer, length_tok,
                                  seed=seed, books_split=books_split,
                                  cache_dir=_babilong_cache_dir(d, split, seed, books_split, length_tok or tokenizer))
    from memlm.data.corpus import load_corpus

    if not os.path.isdir(d.path):
        hint = " (run `memlm data fetch-books DIR` first)" if d.source in ("books", "pg19") else ""
        raise UserError(f"data.path: directory {d.path!r} does not exist{hint}")
    source = "pg19" if d.source in ("books", "pg19") else "text_dir"
    cache = d.cache_dir or os.path.join(d.path, ".memlm_cache")
    return load_corpus(source, d.path, split, tokenizer, cache_dir=cache)


def train_batcher(cfg, corpus, slots):
    if cfg.data.source == "babilong":  # one whole sample per row, so BPTT spans context and answer
        from memlm.eval.babilong_finetune import SampleBatcher

        return SampleBatcher(corpus, cfg.train.batch_size, cfg.data.n_segments, cfg.data.segment_len,
                             seed=cfg.run.seed, slots=slots)
    from memlm.data.batcher import SegmentBatcher

    return SegmentBatcher(corpus, cfg.train.batch_size, cfg.data.n_segments, cfg.data.segment_len,
                          seed=cfg.run.seed, slots=slots)


def eval_batches(cfg, corpus, num_batches: int):
    from memlm.data.batcher import eval_batches as _eval

    return _eval(corpus, cfg.train.batch_size, cfg.data.n_segments, cfg.data.segment_len, num_batches, seed=0)
