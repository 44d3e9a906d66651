"""seqio Tasks over memlm corpora (imports tensorflow/seqio/tfds: import this module lazily).

One Task per (source, absolute path, tokenizer), named deterministically by `task_name`:
  * "text_dir": a seqio.FunctionDataSource reading the *.txt documents of a split
    (rules in memlm.data.corpus.iter_text_split);
  * "pg19": a seqio.TfdsDataSource over the `local_pg19/<split>` TFDS builder (memlm/data/local_pg19/).
Preprocessors: text -> "targets", seqio.preprocessors.tokenize (the memlm Tokenizer wrapped as a
seqio.Vocabulary; the text is kept as "targets_pretokenized"), seqio.preprocessors.append_eos.
So `seqio.get_dataset(task_name(...), ...)` works too, e.g. with a packing feature converter.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # P13: silence oneDNN / cuInit noise
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # its startup notice ignores the level above


def _import_quietly():
    """Import tensorflow with the C++ runtime's stderr (fd 2) sent to /dev/null: TF's native logger prints its
    cudart / CPU-feature notices before TF_CPP_MIN_LOG_LEVEL is read. Python-level errors still surface."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)


_import_quietly()

import numpy as np  # noqa: E402
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from memlm.data.local_pg19.metadata import PG19_SPLITS  # noqa: E402
from memlm.data.tokenizers import Tokenizer, encode_to_array, fingerprint_of  # noqa: E402
from memlm.errors import UserError  # noqa: E402

try:  # Why: TF must never grab the accelerator that JAX trains on.
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # devices already initialised; nothing to hide then
    pass

PG19_TFDS_NAME = "local_pg19"
PG19_TFDS_VERSION = "1.0.0"
SOURCES = ("text_dir", "pg19")

# Errors raised inside tf.data generators reach us wrapped in tf.errors; the generator parks them here.
_PENDING_ERRORS: list[BaseException] = []
_REGISTERED: dict[str, tuple] = {}


class TokenizerVocabulary(seqio.Vocabulary):
    """A memlm Tokenizer as a seqio.Vocabulary; the TF ops call the Python tokenizer via tf.py_function."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        super().__init__(extra_ids=0)

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    @property
    def unk_id(self) -> int | None:
        return getattr(self.tokenizer, "unk_id", None)

    @property
    def _base_vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _encode(self, s: str) -> list[int]:
        return self.tokenizer.encode(s)

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        def enc(x):
            return encode_to_array(self.tokenizer, x.numpy().decode("utf-8"))

        ids = tf.py_function(enc, [s], tf.int32)
        ids.set_shape([None])
        return ids

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        def dec(x):
            return self.tokenizer.decode(x.numpy().tolist()).encode("utf-8")

        out = tf.py_function(dec, [ids], tf.string)
        out.set_shape([])
        return out

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, TokenizerVocabulary) and (
            fingerprint_of(other.tokenizer) == fingerprint_of(self.tokenizer)
        )

    def __hash__(self) -> int:
        return hash(fingerprint_of(self.tokenizer))


def task_name(source: str, path: str, tokenizer: Tokenizer) -> str:
    """Deterministic seqio task name for (source, absolute path, tokenizer fingerprint)."""
    path_hash = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:12]
    tok = re.sub(r"[^A-Za-z0-9_]", "_", fingerprint_of(tokenizer))
    return f"memlm_{source}_{path_hash}_{tok}"


def _text_dir_source(path: str) -> seqio.DataSource:
    from memlm.data.corpus import iter_text_split, text_split_files

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed  # documents come in sorted file order; shuffling is the batcher's job
        text_split_files(path, split)  # fail early (eagerly, outside tf.data) on a missing directory

        def gen():
            try:
                for index, (name, text) in enumerate(iter_text_split(path, split)):
                    yield {"text": text, "doc_name": name, "doc_index": index}
            except UserError as e:
                _PENDING_ERRORS.append(e)
                raise

        return tf.data.Dataset.from_generator(
            gen,
            output_signature={
                "text": tf.TensorSpec((), tf.string),
                "doc_name": tf.TensorSpec((), tf.string),
                "doc_index": tf.TensorSpec((), tf.int64),
            },
        )

    # The split names are only a declaration; a text_dir with split subdirectories may have others.
    return seqio.FunctionDataSource(dataset_fn, splits=("train", "validation", "test"))


class LocalTfdsDataSource(seqio.TfdsDataSource):
    """A TfdsDataSource whose splits live in different builder configs (`local_pg19/<split>`).

    Reads prepared data only: no download and no GCS lookup (seqio's non-read-only path calls
    tfds.load(try_gcs=True), a network call; its read-only path ignores a per-split TfdsSplit map).
    """

    def __init__(self, splits: dict[str, seqio.utils.TfdsSplit]):
        self._split_map = dict(splits)
        super().__init__(splits=splits, read_only=True)

    def _builder(self, split: str):
        s = self._split_map[split]
        return tfds.builder(s.dataset, data_dir=s.data_dir)

    def get_dataset(self, split=None, shuffle=True, seed=None, shard_info=None, **unused) -> tf.data.Dataset:
        split = split or "train"
        read_config = tfds.ReadConfig(shuffle_seed=seed, skip_prefetch=True)
        if shard_info:
            read_config.input_context = tf.distribute.InputContext(
                num_input_pipelines=shard_info.num_shards, input_pipeline_id=shard_info.index
            )
        return self._builder(split).as_dataset(
            split=self._split_map[split].split, shuffle_files=shuffle, read_config=read_config
        )

    def num_input_examples(self, split: str) -> int | None:
        return self._builder(split).info.splits[self._split_map[split].split].num_examples


def _pg19_source(tfds_data_dir: str) -> seqio.DataSource:
    splits = {
        s: seqio.utils.TfdsSplit(
            dataset=f"{PG19_TFDS_NAME}/{s}:{PG19_TFDS_VERSION}", split=s, data_dir=tfds_data_dir
        )
        for s in PG19_SPLITS
    }
    return LocalTfdsDataSource(splits)


def _pg19_to_text(dataset: tf.data.Dataset) -> tf.data.Dataset:
    def fn(ex):
        book_id = tf.cast(ex["book_id"], tf.int64)
        return {"text": ex["book_text"], "doc_name": tf.strings.as_string(book_id), "doc_index": book_id}

    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _text_to_targets(dataset: tf.data.Dataset) -> tf.data.Dataset:
    def fn(ex):
        out = dict(ex)
        out["targets"] = out.pop("text")
        return out

    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def register_task(source: str, path: str, tokenizer: Tokenizer, tfds_data_dir: str | None = None) -> str:
    """Register (or re-register after a change of tfds_data_dir) the Task; returns its name."""
    if source not in SOURCES:
        raise UserError(f"source: expected one of {', '.join(SOURCES)}, got {source!r}")
    if source == "pg19" and not tfds_data_dir:
        raise ValueError("pg19 tasks need a tfds_data_dir")
    path = os.path.abspath(path)
    name = task_name(source, path, tokenizer)
    key = (source, path, fingerprint_of(tokenizer), tfds_data_dir if source == "pg19" else None)
    if name in seqio.TaskRegistry.names():
        if _REGISTERED.get(name) == key:
            return name
        seqio.TaskRegistry.remove(name)
    data_source = _text_dir_source(path) if source == "text_dir" else _pg19_source(tfds_data_dir)
    pre = [_pg19_to_text] if source == "pg19" else []
    seqio.TaskRegistry.add(
        name,
        source=data_source,
        preprocessors=pre + [_text_to_targets, seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        output_features={
            "targets": seqio.Feature(vocabulary=TokenizerVocabulary(tokenizer), add_eos=True, dtype=tf.int32)
        },
    )
    _REGISTERED[name] = key
    return name


PREPARE_LOCK = ".memlm-prepare.lock"


@contextlib.contextmanager
def tfds_prepare_lock(tfds_data_dir: str) -> Iterator[None]:
    """One process at a time prepares into a TFDS directory. TFDS writes a config into `incomplete.*` and renames
    it into place; a second process preparing the same config at once (two `memlm train` runs started together
    on fresh data) failed that rename. An advisory flock on <tfds_data_dir>/.memlm-prepare.lock: whoever waited
    then finds the config prepared and only reads it. A directory this process cannot write (a shared, already
    prepared copy) is only read, so it goes without the lock."""
    try:
        os.makedirs(tfds_data_dir, exist_ok=True)
        lock = open(os.path.join(tfds_data_dir, PREPARE_LOCK), "a")
    except OSError:
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prepare_pg19(path: str, split: str, tfds_data_dir: str) -> None:
    """Generate `local_pg19/<split>` from the local PG-19 tree `path` into tfds_data_dir (no-op if done)."""
    from memlm.data.local_pg19 import local_pg19_dataset_builder  # noqa: F401  (registers the builder)

    with tfds_prepare_lock(tfds_data_dir):  # the builder is made inside: it sees what a waited-for process wrote
        builder = tfds.builder(f"{PG19_TFDS_NAME}/{split}:{PG19_TFDS_VERSION}", data_dir=tfds_data_dir)
        # TFDS prints its "Downloading and preparing" banner to stdout; keep stdout for results.
        with contextlib.redirect_stdout(sys.stderr):
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(
                    manual_dir=os.path.abspath(path), compute_stats=tfds.download.ComputeStatsMode.SKIP
                )
            )


def iter_documents(
    source: str, path: str, split: str, tokenizer: Tokenizer, tfds_data_dir: str | None = None
) -> Iterator[tuple[int, str, str, np.ndarray]]:
    """Yield (doc_index, doc_name, text, tokens int32 [n] ending in eos) for one split, via the seqio Task.

    doc_index orders documents: the position in sorted file order (text_dir) or the book_id (pg19).
    """
    name = register_task(source, path, tokenizer, tfds_data_dir)
    if source == "pg19":
        prepare_pg19(path, split, tfds_data_dir)
    task = seqio.get_mixture_or_task(name)
    ds = task.get_dataset(
        sequence_length=None, split=split, shuffle=False, num_epochs=1, try_in_mem_cache=False
    )
    _PENDING_ERRORS.clear()
    try:
        for ex in ds.as_numpy_iterator():
            yield (
                int(ex["doc_index"]),
                ex["doc_name"].decode("utf-8"),
                ex["targets_pretokenized"].decode("utf-8"),
                np.asarray(ex["targets"], dtype=np.int32),
            )
    except tf.errors.OpError:
        if _PENDING_ERRORS:
            raise _PENDING_ERRORS.pop() from None
        raise
