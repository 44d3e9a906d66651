"""Austen mini PG-19: the R XDR / .rdb reader on synthetic bytes, .deb unpacking, the output layout,
and (marked integration) the real `apt-get download r-cran-janeaustenr`."""

from __future__ import annotations

import csv
import io
import shutil
import struct
import tarfile
import zlib

import pytest

from memlm.data import books
from memlm.data.local_pg19 import pg19_split_files, read_metadata
from memlm.errors import UserError

pytestmark = pytest.mark.unit

ASCII, UTF8, LATIN1 = 0x40, 0x08, 0x04  # CHARSXP encoding levels (flags >> 12)


def xdr_character_vector(items, version: int = 3) -> bytes:
    """What R's serialize(x, xdr=TRUE) writes for a character vector x (None = NA_character_)."""
    out = bytearray(b"X\n")
    out += struct.pack(">iii", version, 0x040201, 0x030500)  # format, R 4.2.1 writer, R 3.5.0 reader
    if version == 3:
        out += struct.pack(">i", 5) + b"UTF-8"
    out += struct.pack(">ii", 0x10, len(items))  # STRSXP, no attributes
    for item in items:
        if item is None:
            out += struct.pack(">ii", 0x09, -1)
            continue
        s, level = (item, None) if isinstance(item, str) else item
        if level == LATIN1:
            data = s.encode("latin-1")
        else:
            data = s.encode("utf-8")
            level = level or (ASCII if s.isascii() else UTF8)
        out += struct.pack(">ii", 0x09 | (level << 12), len(data)) + data
    return bytes(out)


def rdb(records) -> bytes:
    """An R lazy-load database: per record a big-endian uncompressed length + a zlib stream."""
    return b"".join(struct.pack(">I", len(r)) + zlib.compress(r) for r in records)


def test_parse_character_vector_encodings_and_na():
    raw = xdr_character_vector(["EMMA", "", "naïve café — 日本", None, ("Mus\u00e9e", LATIN1), "end"])
    assert books.parse_r_character_vector(raw) == ["EMMA", "", "naïve café — 日本", None, "Musée", "end"]
    assert books.parse_r_character_vector(xdr_character_vector(["a", "b"], version=2)) == ["a", "b"]


def test_parse_rejects_other_objects():
    with pytest.raises(ValueError, match="XDR"):
        books.parse_r_character_vector(b"A\n3\n")
    integer_vector = b"X\n" + struct.pack(">iii", 2, 0, 0) + struct.pack(">ii", 13, 1) + struct.pack(">i", 7)
    with pytest.raises(ValueError, match="not a character vector"):
        books.parse_r_character_vector(integer_vector)
    with pytest.raises(ValueError, match="truncated"):
        books.parse_r_character_vector(xdr_character_vector(["abcdef"])[:-3])


def test_read_rdb_splits_records():
    recs = [["first", "record"], ["second", None, "ä"], []]
    data = rdb([xdr_character_vector(r) for r in recs])
    assert books.read_rdb(data) == recs
    with pytest.raises(ValueError, match="header says"):
        books.read_rdb(struct.pack(">I", 999) + zlib.compress(xdr_character_vector(["x"])))
    with pytest.raises(ValueError, match="truncated"):
        books.read_rdb(data[:-5])


def _fake_novels():
    """Six short 'novels' whose first line is the title, as in janeaustenr (its order differs on purpose)."""
    novels = {}
    for i, b in enumerate(reversed(books.AUSTEN_BOOKS)):
        title_line = b.title.upper() if i % 2 else b.title
        novels[b.book_id] = [title_line, "", "by Jane Austen", "", f"Chapter 1 of book {b.book_id}, é.", "x"]
    return novels


def _fake_deb(files: dict[str, bytes], compression: str = "xz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo("./" + path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", b"ignored"), (f"data.tar.{compression}",
                                                                              buf.getvalue())]
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        assert len(header) == 60
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def test_books_from_fake_deb_write_pg19_layout(tmp_path):
    novels = _fake_novels()
    description = b"Package: janeaustenr\nVersion: 1.0.0\nLicense: MIT + file LICENSE\nURL: https://x\n"
    copyright_ = b"Files: *\nCopyright: 2016 Someone\nLicense: MIT\n"
    deb = _fake_deb({
        books.RDB_MEMBER: rdb([xdr_character_vector(lines) for lines in novels.values()]),
        books.DESCRIPTION_MEMBER: description,
        books.COPYRIGHT_MEMBER: copyright_,
        "usr/share/doc/other": b"unrelated",
    })
    assert set(books.extract_deb_members(deb, (books.RDB_MEMBER,))) == {books.RDB_MEMBER}
    deb_path = tmp_path / "r-cran-janeaustenr_1.0.0-1_all.deb"
    deb_path.write_bytes(deb)
    texts, source_md = books.books_from_deb(str(deb_path))
    assert texts == {k: "\n".join(v) for k, v in novels.items()}
    assert "MIT + file LICENSE" in source_md and "License MIT" in source_md
    assert "Project Gutenberg" in source_md and "2016 Someone" in source_md
    assert "r-cran-janeaustenr_1.0.0-1_all.deb" in source_md

    out = tmp_path / "books"
    books.write_books_dir(str(out), texts, source_md)
    assert books._is_complete(str(out))
    meta = read_metadata(str(out / "metadata.csv"))
    assert sorted(meta) == sorted(b.book_id for b in books.AUSTEN_BOOKS)
    assert meta[1342].title == "Pride and Prejudice" and meta[1342].book_link.endswith("/1342")
    counts = {s: len(pg19_split_files(str(out), s)[1]) for s in ("train", "validation", "test")}
    assert counts == {"train": 4, "validation": 1, "test": 1}
    for b in books.AUSTEN_BOOKS:
        assert (out / b.split / f"{b.book_id}.txt").read_text(encoding="utf-8") == texts[b.book_id]
    with open(out / "metadata.csv", newline="", encoding="utf-8") as f:
        assert all(len(row) == 4 and row[0].isdigit() for row in csv.reader(f))  # no header row


def test_missing_novel_is_reported(tmp_path):
    novels = _fake_novels()
    novels.pop(158)
    with pytest.raises(ValueError, match="Emma"):
        books._identify(books.read_rdb(rdb([xdr_character_vector(v) for v in novels.values()])))


def test_fetch_books_reuses_complete_dir_and_reports_missing_apt(tmp_path, monkeypatch):
    novels = _fake_novels()
    books.write_books_dir(str(tmp_path / "b"), {k: "\n".join(v) for k, v in novels.items()}, "# src\n")
    monkeypatch.setattr(books, "_apt_download", lambda _: pytest.fail("a complete directory must be reused"))
    assert books.fetch_books(str(tmp_path / "b")) == str(tmp_path / "b")
    monkeypatch.undo()
    monkeypatch.setattr(books.shutil, "which", lambda _: None)
    with pytest.raises(UserError, match="apt-get") as e:
        books.fetch_books(str(tmp_path / "new"))
    assert "\n" not in str(e.value)


@pytest.mark.integration
def test_fetch_books_real_apt(tmp_path):
    if shutil.which("apt-get") is None:
        pytest.skip("apt-get is not available on this system")
    try:
        out = books.fetch_books(str(tmp_path / "austen"))
    except UserError as e:
        pytest.skip(f"apt-get could not fetch r-cran-janeaustenr: {e}")
    meta, train = pg19_split_files(out, "train")
    assert [b for b, _ in train] == [141, 158, 161, 1342]
    text = (tmp_path / "austen" / "train" / "1342.txt").read_text(encoding="utf-8")
    assert text.startswith("PRIDE AND PREJUDICE") and "It is a truth universally acknowledged" in text
    words = sum(len((tmp_path / "austen" / b.split / f"{b.book_id}.txt").read_text("utf-8").split())
                for b in books.AUSTEN_BOOKS)
    assert 700_000 < words < 740_000  # benchmarks.md §4.1: 717,537 words
    source = (tmp_path / "austen" / "SOURCE.md").read_text(encoding="utf-8")
    assert "MIT" in source and "public domain" in source
