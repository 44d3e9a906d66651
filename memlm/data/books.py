"""A mini PG-19 of real public-domain books: Jane Austen's six novels from Debian's r-cran-janeaustenr.

benchmarks.md §4.1: `apt-get download r-cran-janeaustenr`, unpack the .deb (an `ar` archive holding
data.tar.*), and read usr/lib/R/site-library/janeaustenr/data/Rdata.rdb without R. That file is a
concatenation of records, each a 4-byte big-endian uncompressed length followed by a zlib stream; each
record is one R object in XDR serialization ("X\\n" format), here a character vector holding one line
of a novel per element. The lines are joined with "\\n".

Output (the PG-19 layout of memlm.data.corpus, book_id = Project Gutenberg ebook number):
  DIR/metadata.csv (no header: book_id,title,publication_date,book_link),
  DIR/{train,validation,test}/<id>.txt, DIR/SOURCE.md (provenance and licenses).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
import zlib
from dataclasses import dataclass

from memlm.errors import UserError

__all__ = ["fetch_books", "read_rdb", "parse_r_character_vector", "extract_deb_members", "AUSTEN_BOOKS",
           "write_books_dir"]

PACKAGE = "r-cran-janeaustenr"
RDB_MEMBER = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
DESCRIPTION_MEMBER = "usr/lib/R/site-library/janeaustenr/DESCRIPTION"
COPYRIGHT_MEMBER = "usr/share/doc/r-cran-janeaustenr/copyright"


@dataclass(frozen=True)
class Book:
    book_id: int  # Project Gutenberg ebook number (the texts janeaustenr was built from)
    title: str
    year: str  # first publication; Northanger Abbey and Persuasion appeared together in December 1817
    split: str


# Deterministic split: the four novels published in Austen's lifetime train; the two posthumous ones
# (the two smallest books) are held out.
AUSTEN_BOOKS = (
    Book(161, "Sense and Sensibility", "1811", "train"),
    Book(1342, "Pride and Prejudice", "1813", "train"),
    Book(141, "Mansfield Park", "1814", "train"),
    Book(158, "Emma", "1815", "train"),
    Book(121, "Northanger Abbey", "1817", "validation"),
    Book(105, "Persuasion", "1817", "test"),
)


# ----------------------------------------------------------------------------- R serialization

_R_STRSXP, _R_CHARSXP = 16, 9
_R_LATIN1, _R_UTF8, _R_BYTES = 1 << 2, 1 << 3, 1 << 1  # CHARSXP "levels" (flags >> 12) encoding bits


def parse_r_character_vector(raw: bytes) -> list[str | None]:
    """Decode one R XDR-serialized character vector (STRSXP); NA elements become None.

    Layout: b"X\\n"; int32 version; int32 writer R version; int32 minimal R version; for version 3 an
    int32 length + native-encoding name; then the item: int32 flags (type = low byte), int32 length
    (-1: a 64-bit length follows as two int32), and per element int32 flags (CHARSXP) + int32 byte length
    (-1 = NA) + bytes. Trailing attributes (names etc.) are ignored.
    """
    if raw[:2] != b"X\n":
        raise ValueError(f"not an R XDR serialization (starts with {raw[:2]!r})")
    pos = 2

    def i32() -> int:
        nonlocal pos
        if pos + 4 > len(raw):
            raise ValueError("truncated R serialization")
        (v,) = struct.unpack_from(">i", raw, pos)
        pos += 4
        return v

    version = i32()
    i32(), i32()  # writer and minimal reader R versions
    if version == 3:
        enc_len = i32()  # (not `pos += i32()`: that would add to the pre-call pos)
        pos += enc_len  # native encoding name, e.g. "UTF-8"
    elif version != 2:
        raise ValueError(f"unsupported R serialization version {version}")
    flags = i32()
    if flags & 0xFF != _R_STRSXP:
        raise ValueError(f"R object type {flags & 0xFF} is not a character vector (16)")
    n = i32()
    if n == -1:
        hi, lo = i32(), i32()
        n = (hi << 32) | (lo & 0xFFFFFFFF)
    out: list[str | None] = []
    for _ in range(n):
        cflags = i32()
        if cflags & 0xFF != _R_CHARSXP:
            raise ValueError(f"R element type {cflags & 0xFF} is not CHARSXP (9)")
        length = i32()
        if length == -1:
            out.append(None)
            continue
        data = raw[pos : pos + length]
        if len(data) != length:
            raise ValueError("truncated R string")
        pos += length
        levels = cflags >> 12
        enc = "latin-1" if levels & _R_LATIN1 else "utf-8"  # UTF8 and ASCII (and native UTF-8 locales)
        out.append(data.decode(enc, errors="replace"))
    return out


def read_rdb(data: bytes) -> list[list[str | None]]:
    """Split an R lazy-load database (.rdb) into records and decode each as a character vector."""
    records = []
    pos = 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise ValueError(f"truncated .rdb record header at byte {pos}")
        (length,) = struct.unpack_from(">I", data, pos)
        d = zlib.decompressobj()
        raw = d.decompress(data[pos + 4 :])
        if not d.eof:
            raise ValueError(f"truncated zlib stream in .rdb record at byte {pos}")
        if len(raw) != length:
            raise ValueError(f".rdb record at byte {pos}: {len(raw)} bytes, header says {length}")
        records.append(parse_r_character_vector(raw))
        pos = len(data) - len(d.unused_data)
    return records


# ----------------------------------------------------------------------------- .deb unpacking


def extract_deb_members(deb: bytes, wanted: tuple[str, ...]) -> dict[str, bytes]:
    """Return {path: bytes} for the `wanted` paths of a .deb's data.tar.{xz,gz,bz2,<none>}.

    A .deb is an `ar` archive: b"!<arch>\\n", then 60-byte headers (name 16, ..., size at 48:58 decimal)
    each followed by the member padded to even length.
    """
    if deb[:8] != b"!<arch>\n":
        raise ValueError("not a Debian package (no ar magic)")
    pos = 8
    data_tar = None
    while pos + 60 <= len(deb):
        header = deb[pos : pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = deb[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            data_tar = (name, body)
        pos += 60 + size + (size & 1)
    if data_tar is None:
        raise ValueError("no data.tar member in the .deb")
    name, body = data_tar
    if name.endswith(".zst"):
        raise ValueError("data.tar.zst needs dpkg-deb")
    out = {}
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
        for member in tar.getmembers():
            path = member.name[2:] if member.name.startswith("./") else member.name
            if path in wanted and member.isfile():
                out[path] = tar.extractfile(member).read()
    return out


def _members_with_dpkg(deb_path: str, wanted: tuple[str, ...]) -> dict[str, bytes]:
    """Fallback for compressions tarfile cannot read: `dpkg -x` into a temporary directory."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg", "-x", deb_path, tmp], check=True, capture_output=True, timeout=300)
        out = {}
        for w in wanted:
            p = os.path.join(tmp, w)
            if os.path.isfile(p):
                with open(p, "rb") as f:
                    out[w] = f.read()
        return out


def _apt_download(workdir: str) -> str:
    """`apt-get download` the package into workdir (running `apt-get update` once if needed)."""
    if shutil.which("apt-get") is None:
        raise UserError(f"{PACKAGE}: apt-get not found; cannot fetch the books on this system")
    cmd = ["apt-get", "download", PACKAGE]
    r = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=600)
        r = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600)
    debs = [f for f in os.listdir(workdir) if f.startswith(PACKAGE) and f.endswith(".deb")]
    if r.returncode != 0 or not debs:
        last = (r.stderr or r.stdout).strip().splitlines()
        raise UserError(f"{PACKAGE}: apt-get download failed ({last[-1] if last else 'no output'})")
    return os.path.join(workdir, sorted(debs)[-1])


# ----------------------------------------------------------------------------- the books directory


def _identify(records: list[list[str | None]]) -> dict[int, str]:
    """Map each AUSTEN_BOOKS id to its text, recognising a novel by its first non-empty line (the title)."""
    by_title = {b.title.lower(): b for b in AUSTEN_BOOKS}
    texts: dict[int, str] = {}
    for lines in records:
        first = next((ln.strip() for ln in lines if ln and ln.strip()), "")
        book = by_title.get(first.lower())
        if book is not None:
            texts[book.book_id] = "\n".join("" if ln is None else ln for ln in lines)
    missing = [b.title for b in AUSTEN_BOOKS if b.book_id not in texts]
    if missing:
        raise ValueError(f"novels not found in Rdata.rdb: {', '.join(missing)}")
    return texts


def _is_complete(out_dir: str) -> bool:
    need = ["metadata.csv", "SOURCE.md"] + [os.path.join(b.split, f"{b.book_id}.txt") for b in AUSTEN_BOOKS]
    return all(os.path.isfile(os.path.join(out_dir, p)) and os.path.getsize(os.path.join(out_dir, p)) > 0
               for p in need)


def _source_md(deb_name: str, description: str, copyright_text: str) -> str:
    fields = {}
    for line in description.splitlines():
        if ":" in line and not line.startswith((" ", "\t")):
            k, v = line.split(":", 1)
            fields[k.strip()] = v.strip()
    deb_licenses = sorted({ln.split(":", 1)[1].strip() for ln in copyright_text.splitlines()
                           if ln.startswith("License:")})
    deb_holders = [ln.split(":", 1)[1].strip() for ln in copyright_text.splitlines()
                   if ln.startswith("Copyright:")]
    rows = "\n".join(f"| {b.book_id} | {b.title} | {b.year} | {b.split} |" for b in AUSTEN_BOOKS)
    return f"""# Source of these books

- **Texts**: Jane Austen's six novels, originally from Project Gutenberg (public domain; Austen died in
  1817). `book_id` is the Project Gutenberg ebook number; `book_link` points to it.
- **Obtained from**: the Debian package `{deb_name}` (`apt-get download {PACKAGE}`), file
  `{RDB_MEMBER}`, decoded by memlm.data.books (R lazy-load records: zlib + XDR character vectors,
  lines joined with "\\n").
- **R package**: {fields.get("Package", "janeaustenr")} {fields.get("Version", "?")} by
  {fields.get("Maintainer", fields.get("Author", "?"))}; {fields.get("URL", "")}
- **License of the R package** (its DESCRIPTION): `{fields.get("License", "not stated")}`.
  Debian copyright file: License {", ".join(deb_licenses) or "not stated"}
  (Copyright: {"; ".join(deb_holders) or "not stated"}).
  The novels themselves are in the public domain.

| book_id | title | published | split |
|---|---|---|---|
{rows}
"""


def write_books_dir(out_dir: str, texts: dict[int, str], source_md: str) -> None:
    """Write the PG-19 layout for AUSTEN_BOOKS from {book_id: text}. A file already there with other content
    (the user's own metadata.csv or an edited book) is not replaced: UserError naming it, nothing written."""
    rows = io.StringIO()
    w = csv.writer(rows, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    for b in AUSTEN_BOOKS:
        w.writerow([b.book_id, b.title, b.year, f"http://www.gutenberg.org/ebooks/{b.book_id}"])
    files = {os.path.join(b.split, f"{b.book_id}.txt"): texts[b.book_id] for b in AUSTEN_BOOKS}
    files["SOURCE.md"] = source_md
    files["metadata.csv"] = rows.getvalue()  # last: its presence (with the rest) marks the directory complete
    for rel, text in files.items():
        path = os.path.join(out_dir, rel)
        if os.path.lexists(path):
            try:
                with open(path, encoding="utf-8", newline="") as f:
                    same = f.read() == text
            except (OSError, UnicodeDecodeError):
                same = False
            if not same:
                raise UserError(f"{path}: already exists with other content; fetch-books does not replace it "
                                "(move it away or choose another directory)")
    for split in ("train", "validation", "test"):
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    for rel, text in files.items():
        with open(os.path.join(out_dir, rel), "w", encoding="utf-8", newline="") as f:
            f.write(text)


def books_from_deb(deb_path: str) -> tuple[dict[int, str], str]:
    """(texts by book_id, SOURCE.md text) from a downloaded r-cran-janeaustenr .deb."""
    wanted = (RDB_MEMBER, DESCRIPTION_MEMBER, COPYRIGHT_MEMBER)
    with open(deb_path, "rb") as f:
        deb = f.read()
    try:
        members = extract_deb_members(deb, wanted)
    except (ValueError, tarfile.TarError):
        members = _members_with_dpkg(deb_path, wanted)
    if RDB_MEMBER not in members:
        raise ValueError(f"{RDB_MEMBER} not in the package")
    texts = _identify(read_rdb(members[RDB_MEMBER]))
    md = _source_md(
        os.path.basename(deb_path),
        members.get(DESCRIPTION_MEMBER, b"").decode("utf-8", "replace"),
        members.get(COPYRIGHT_MEMBER, b"").decode("utf-8", "replace"),
    )
    return texts, md


def fetch_books(out_dir: str) -> str:
    """Build (or reuse, if complete) a PG-19-layout directory of the six Austen novels; returns its path."""
    out_dir = os.path.abspath(out_dir)
    if _is_complete(out_dir):
        return out_dir
    with tempfile.TemporaryDirectory(prefix="memlm-books-") as tmp:
        try:
            deb_path = _apt_download(tmp)
        except subprocess.SubprocessError as e:
            raise UserError(f"{PACKAGE}: apt-get failed ({type(e).__name__})") from None
        try:
            texts, md = books_from_deb(deb_path)
        except (ValueError, OSError, subprocess.SubprocessError, zlib.error, tarfile.TarError) as e:
            raise UserError(f"{os.path.basename(deb_path)}: cannot extract the novels ({e})") from None
    try:
        write_books_dir(out_dir, texts, md)
    except OSError as e:
        raise UserError(f"{out_dir}: cannot write the books ({e.strerror})") from None
    return out_dir
