"""TFDS builder `local_pg19`: PG-19 (Rae et al. 2019) read from a local directory instead of GCS.

Same features as TFDS `pg19` 0.1.1 (book_text, book_id int32, book_title, publication_date, book_link).
Why one builder config per split (`local_pg19/train`, `/validation`, `/test`): preparing the test split for
evaluation must not copy the 11 GB train split; each config generates only the split it is named after.

The PG-19 directory is passed as the manual dir:
    builder = tfds.builder("local_pg19/test", data_dir=D)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=PG19_DIR))
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from memlm.data.local_pg19.metadata import PG19_SPLITS, pg19_split_files
from memlm.errors import UserError


class Builder(tfds.core.GeneratorBasedBuilder):
    """Local PG-19: metadata.csv (no header) + train/ validation/ test/ of <book_id>.txt."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "PG-19 from a local directory; one config per split."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=split, description=f"PG-19 {split} split only") for split in PG19_SPLITS
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass the PG-19 directory (metadata.csv plus train/, validation/, test/ of <book_id>.txt) as "
        "download_config.manual_dir."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "book_text": tfds.features.Text(),
                    "book_id": tfds.features.Scalar(dtype=np.int32),
                    "book_title": tfds.features.Text(),
                    "publication_date": tfds.features.Text(),
                    "book_link": tfds.features.Text(),
                }
            ),
            supervised_keys=None,
            homepage="https://github.com/deepmind/pg19",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = os.fspath(dl_manager.manual_dir)
        split = self.builder_config.name
        # Validate eagerly so a bad tree fails before TFDS starts writing.
        meta, files = pg19_split_files(root, split)
        return {split: self._generate_examples(meta, files)}

    def _generate_examples(self, meta, files):
        for book_id, path in files:
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: not valid UTF-8 (byte {e.start})") from None
            m = meta[book_id]
            yield book_id, {
                "book_text": text,
                "book_id": book_id,
                "book_title": m.title,
                "publication_date": m.publication_date,
                "book_link": m.book_link,
            }
