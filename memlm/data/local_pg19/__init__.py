"""TFDS builder `local_pg19` over a local copy of PG-19 (Rae et al. 2019), plus a TF-free metadata reader.

Importing this package does not import tensorflow_datasets; import `local_pg19_dataset_builder` for that
(TFDS infers the dataset name "local_pg19" from that module name, stack-notes.md P8).
"""

from memlm.data.local_pg19.metadata import PG19_SPLITS, BookMeta, pg19_split_files, read_metadata

__all__ = ["PG19_SPLITS", "BookMeta", "pg19_split_files", "read_metadata"]
