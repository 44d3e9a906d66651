"""`memlm data ...` subcommands: fetch-books, train-tokenizer, stats, babilong-tfds.

memlm/cli.py calls `add_data_commands(subparsers)`; each command returns an exit code, and UserError
propagates to memlm/cli.py (exit code 2).
"""

from __future__ import annotations

import argparse

from memlm.data.tokenizers import TOKENIZER_KINDS
from memlm.errors import check_output_dir, check_output_file

__all__ = ["add_data_commands"]


def _fetch_books(args: argparse.Namespace) -> int:
    from memlm.data.books import AUSTEN_BOOKS, fetch_books

    out = fetch_books(args.dir)
    print(f"books: {out} ({len(AUSTEN_BOOKS)} novels; metadata.csv, train/ validation/ test/, SOURCE.md)")
    return 0


def _train_tokenizer(args: argparse.Namespace) -> int:
    from memlm.data.tokenizers import SentencePieceTokenizer, train_sentencepiece

    for ext in (".model", ".vocab"):
        check_output_file(args.out + ext, "--out", args.force)
    model = train_sentencepiece(args.input, args.out, args.vocab_size, model_type=args.model_type)
    tok = SentencePieceTokenizer(model)
    print(f"tokenizer: {model} ({args.model_type}, vocab {tok.vocab_size}, "
          f"pad {tok.pad_id}, eos {tok.eos_id})")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from memlm.data.corpus import load_corpus
    from memlm.data.tokenizers import load_tokenizer

    tok = load_tokenizer(args.tokenizer, args.tokenizer_path)
    corpus = load_corpus(args.source, args.path, args.split, tok, cache_dir=args.cache_dir)
    lengths = corpus.doc_lengths
    words = corpus.total_words
    print(f"corpus: {corpus.name}")
    print(f"docs: {corpus.num_docs}")
    print(f"tokens: {corpus.total_tokens}  (eos included; tokenizer {tok.name}, vocab {tok.vocab_size})")
    print(f"words: {words}  (whitespace-separated)")
    if words:
        print(f"tokens_per_word: {(corpus.total_tokens - corpus.num_docs) / words:.4f}  (eos excluded)")
    print(f"doc_tokens: min {int(lengths.min())}  mean {float(lengths.mean()):.1f}  max {int(lengths.max())}")
    return 0


def _babilong_tfds(args: argparse.Namespace) -> int:
    import os

    from memlm.errors import UserError

    check_output_dir(args.out, "--out")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    if args.tasks is not None and not tasks:
        raise UserError("--tasks: no task given (e.g. qa1,qa2)")
    from memlm.data.babilong_tfds import BABILONG_TFDS_NAME, prepare_babilong  # imports tensorflow

    counts = prepare_babilong(args.data, args.out, tasks)
    for task, by_length in counts.items():
        print(f"{task}: " + "  ".join(f"{length} {n}" for length, n in by_length.items()))
    print(f"tfds: {os.path.abspath(args.out)} ({BABILONG_TFDS_NAME}/<task>, one split per length)")
    return 0


def add_data_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `memlm data {fetch-books,train-tokenizer,stats,babilong-tfds}` on the top-level subparsers."""
    p = subparsers.add_parser(
        "data",
        help="prepare data: fetch public-domain books, train a tokenizer, corpus statistics",
        description="Data preparation commands.",
    )
    sub = p.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    fb = sub.add_parser(
        "fetch-books",
        help="build a mini PG-19 directory of Jane Austen's six novels (Debian r-cran-janeaustenr)",
        description=(
            "Download the Debian package r-cran-janeaustenr with apt-get (no R needed), decode its "
            "Rdata.rdb and write DIR in the PG-19 layout: metadata.csv (no header), train/ (4 novels), "
            "validation/ (Northanger Abbey), test/ (Persuasion) and SOURCE.md (provenance, licenses). "
            "A complete DIR is reused."
        ),
    )
    fb.add_argument("dir", metavar="DIR", help="output directory (created if missing)")
    fb.set_defaults(func=_fetch_books)

    tt = sub.add_parser(
        "train-tokenizer",
        help="train a SentencePiece model (pad 0, eos 1, unk 2, no bos)",
        description=(
            "Train a SentencePiece model on the text of --input and write PREFIX.model and PREFIX.vocab. "
            "A directory is read like a text_dir/pg19 corpus's train split (DIR/train/*.txt if it exists, "
            "else the first 90% of every DIR/*.txt), so held-out text never enters the vocabulary."
        ),
    )
    tt.add_argument("--input", required=True, metavar="DIR_OR_FILE", help="training text directory or file")
    tt.add_argument("--out", required=True, metavar="PREFIX", help="output prefix (writes PREFIX.model)")
    tt.add_argument("--vocab-size", required=True, type=int, metavar="N", help="number of pieces")
    tt.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram",
                    help="SentencePiece algorithm (default: unigram)")
    tt.add_argument("--force", action="store_true", help="overwrite an existing PREFIX.model / PREFIX.vocab")
    tt.set_defaults(func=_train_tokenizer)

    st = sub.add_parser(
        "stats",
        help="documents, tokens and words of one corpus split",
        description=(
            "Load one split of a corpus through memlm's data layer and print documents, tokens "
            "(one eos per document included), whitespace-separated words and tokens per word."
        ),
    )
    st.add_argument("--source", required=True, choices=("text_dir", "pg19"),
                    help="text_dir: a directory of *.txt; pg19: metadata.csv + train/ validation/ test/")
    st.add_argument("--path", required=True, metavar="DIR", help="corpus directory")
    st.add_argument("--split", required=True, metavar="S", help="split name, e.g. train, validation, test")
    st.add_argument("--tokenizer", required=True, choices=TOKENIZER_KINDS, help="tokenizer kind")
    st.add_argument("--tokenizer-path", metavar="P", default=None,
                    help="SentencePiece .model or GPT-2 tiktoken ranks file (not needed for bytes)")
    st.add_argument("--cache-dir", metavar="DIR", default=None,
                    help="cache the tokenized split here (default: no cache)")
    st.set_defaults(func=_stats)

    bt = sub.add_parser(
        "babilong-tfds",
        help="prepare a local BABILong copy as the TFDS dataset local_babilong (config = task, split = length)",
        description=(
            "Read a local BABILong directory (RMT-team/babilong: data/qaN/LEN.json, or "
            "RMT-team/babilong-1k-samples: LEN/qaN-*.parquet) and write the TFDS dataset local_babilong to "
            "--out: one config per task, one split per length, features input, question, target, task, "
            "length, index. Configs already prepared from the same directory are reused. Prints the "
            "records per task and length."
        ),
    )
    bt.add_argument("--data", required=True, metavar="DIR", help="local BABILong directory")
    bt.add_argument("--out", required=True, metavar="TFDS_DIR", help="TFDS data directory (created if missing)")
    bt.add_argument("--tasks", default=None, metavar="qaN,...",
                    help="comma-separated tasks to prepare (default: every task in DIR)")
    bt.set_defaults(func=_babilong_tfds)
    return p
