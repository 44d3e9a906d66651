"""memlm data layer: tokenizers, corpora (seqio tasks over text directories and a local PG-19 TFDS
builder), BABILong as a local TFDS builder + seqio tasks, slot-stable segment batching, a mini PG-19 of
public-domain books, and `memlm data` commands.

Importing this package, memlm.data.tokenizers or memlm.data.batcher does not import tensorflow; only
memlm.data.seqio_tasks, memlm.data.local_pg19.local_pg19_dataset_builder and memlm.data.babilong_tfds do,
and corpus.py / cli.py import them lazily.
"""

from memlm.data.batcher import SegmentBatcher, eval_batches
from memlm.data.corpus import Corpus, load_corpus
from memlm.data.tokenizers import (
    ByteTokenizer,
    GPT2Tokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
)

__all__ = [
    "ByteTokenizer",
    "Corpus",
    "GPT2Tokenizer",
    "SegmentBatcher",
    "SentencePieceTokenizer",
    "Tokenizer",
    "eval_batches",
    "load_corpus",
    "load_tokenizer",
    "train_sentencepiece",
]
