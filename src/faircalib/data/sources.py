"""Where text comes from: a shipped corpus, or the user's own data.

`load_source(spec, split, text_field)` accepts
  - a shipped corpus name (`wikitext2`, `c4`; see `faircalib data`),
  - a plain-text file: one document per blank-line-separated block,
  - a JSON Lines file (`.jsonl`, `.json`, `.ndjson`), one document per line, its text in
    `text_field`; or a `.json` file holding one JSON array of such objects (or of strings),
  - a CSV / TSV file with a header row, one document per row, its text in column `text_field`,
  - a Parquet file (needs pyarrow: the `data` extra), one document per row,
  - any of the text formats gzip-, xz- or bz2-compressed (the bytes decide, not the name;
    suffixes are matched case-insensitively),
  - a directory written by `datasets`' `save_to_disk`, or a hub dataset id `owner/name`
    (both need `datasets`: the `data` extra; the hub needs a network).
Every source carries the sha256 and document count that result records report, so a number can
always be traced to the exact text behind it.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import hashlib
import io
import json
import logging
import lzma
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from faircalib.errors import DataError

DATA_EXTRA = "pip install 'faircalib[data]'"
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
COMPRESSED_SUFFIXES = (".gz", ".xz", ".bz2", ".zst", ".zstd")
HUB_DATASET = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
DEFAULT_CALIB_SPLIT = {"c4": "train"}  # a shipped corpus's calibration split


@dataclass(frozen=True)
class TextSource:
    """Documents plus their provenance. `rows` are the units MDLM's protocol puts an
    end-of-text after (WikiText: its Hugging Face rows, i.e. lines); they equal `docs`
    everywhere else."""

    name: str  # what the user passed: a corpus name, a path or a hub id
    kind: str  # shipped | text | jsonl | csv | parquet | datasets-dir | hub
    split: str | None
    text_field: str | None
    docs: tuple[str, ...]
    sha256: str
    sha256_of: str  # what was hashed: file, decompressed file, directory files, text
    rows: tuple[str, ...] | None = None

    @property
    def row_texts(self) -> tuple[str, ...]:
        return self.docs if self.rows is None else self.rows

    @property
    def key(self) -> tuple:
        """Identity for caches: the same key means the same documents."""
        return (self.kind, self.name, self.split, self.text_field, self.sha256)

    @property
    def label(self) -> str:
        return f"{self.name}/{self.split}" if self.split else self.name

    def record(self) -> dict:
        """What a results file states about its data."""
        return {
            "data": self.name,
            "format": self.kind,
            "split": self.split,
            "text_field": self.text_field,
            "documents": len(self.docs),
            **({"rows": len(self.rows)} if self.rows is not None else {}),
            "sha256": self.sha256,
            "sha256_of": self.sha256_of,
        }


def load_source(spec: str, split: str | None = None, text_field: str = "text") -> TextSource:
    """Resolve `spec` (corpus name, file, datasets directory or hub id) into a TextSource."""
    from faircalib.data.corpora import CORPORA

    if spec in CORPORA:
        return shipped_source(spec, split)
    path = Path(spec).expanduser()
    if path.is_dir():  # records name it absolutely: a replay from elsewhere finds it
        return _has_text(_datasets_dir(path.absolute(), split, text_field))
    if path.is_file():
        if split is not None:
            raise DataError(f"{spec} is a single file: it has no splits (drop --split {split})")
        return _has_text(_file_source(path.absolute(), text_field))
    if HUB_DATASET.fullmatch(spec) and not path.suffix:
        return _has_text(_hub_dataset(spec, split, text_field))
    raise DataError(
        f"{spec!r} is neither a shipped corpus ({', '.join(sorted(CORPORA))}) nor an existing "
        "file or directory (nor a hub dataset id owner/name); check the name or path"
    )


def _has_text(source: TextSource) -> TextSource:
    """Refuse data whose documents are all empty: calibrating on end-of-text tokens alone, or
    evaluating zero bytes, would look like it worked."""
    if not any(doc.strip() for doc in source.docs):
        documents = (
            f"its {len(source.docs):,} document(s) are all empty"
            if source.docs
            else "it holds no documents"
        )
        raise DataError(
            f"{source.name} holds no text: {documents}"
            + (
                f" in field {source.text_field!r} (use --text-field to read another)"
                if source.text_field
                else ""
            )
            + "; check the data"
        )
    return source


def shipped_source(corpus: str, split: str | None) -> TextSource:
    from faircalib.data.corpora import CORPORA, load_rows, load_texts

    if split is None:
        raise DataError(
            f"shipped corpus {corpus!r} needs a split: choose one of {sorted(CORPORA[corpus])}"
        )
    docs = tuple(load_texts(corpus, split))  # checks corpus, split and checksum
    _, sha, kind = CORPORA[corpus][split]
    if kind == "docs-gz":  # one row per document
        return TextSource(corpus, "shipped", split, None, docs, sha, "file")
    rows = tuple(load_rows(corpus, split))
    return TextSource(corpus, "shipped", split, None, docs, sha, "decompressed file", rows)


# --- files ------------------------------------------------------------------------------------
def _file_source(path: Path, text_field: str) -> TextSource:
    raw = path.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return TextSource(
            str(path), "parquet", None, text_field, _parquet_docs(path, text_field), sha, "file"
        )
    data = _decompress(raw, path)
    base_suffix = Path(path.stem).suffix.lower() if suffix in COMPRESSED_SUFFIXES else suffix
    if base_suffix in JSON_SUFFIXES:
        docs = _json_docs(_utf8(data, path), path, text_field)
        return TextSource(str(path), "jsonl", None, text_field, docs, sha, "file")
    if base_suffix in CSV_DELIMITERS:
        docs = _csv_docs(_utf8(data, path), path, text_field, CSV_DELIMITERS[base_suffix])
        return TextSource(str(path), "csv", None, text_field, docs, sha, "file")
    text = _utf8(data, path)
    _warn_if_structured(text, path)
    return TextSource(str(path), "text", None, None, plain_text_docs(text), sha, "file")


def _decompress(raw: bytes, path: Path) -> bytes:
    """gzip, xz or bz2 data decompressed (the magic bytes decide, not the name); else as is."""
    if raw[:4] == b"\x28\xb5\x2f\xfd":
        raise DataError(
            f"{path} is zstd-compressed, which faircalib does not read; convert it first "
            "(zstd -d, or recompress it with gzip or xz)"
        )
    if raw[:2] == b"\x1f\x8b":
        kind, decompress, errors = "gzip", gzip.decompress, (OSError, EOFError)
    elif raw[:6] == b"\xfd7zXZ\x00":  # the corpus shards `faircalib train` reads are .jsonl.xz
        kind, decompress, errors = "xz", lzma.decompress, (lzma.LZMAError, EOFError)
    elif raw[:3] == b"BZh" and raw[4:10] == b"\x31\x41\x59\x26\x53\x59":  # block magic
        kind, decompress, errors = "bz2", bz2.decompress, (OSError, ValueError, EOFError)
    else:
        return raw
    try:
        return decompress(raw)
    except errors as exc:
        raise DataError(
            f"{path} looks {kind}-compressed but cannot be read ({exc}); check the file"
        ) from exc


def _warn_if_structured(text: str, path: Path) -> None:
    """A file read as plain text whose first line is a JSON object is almost surely JSON Lines
    under another name: say how it was read (it still is, as the suffix asks)."""
    first = text.lstrip().split("\n", 1)[0].strip()
    if first.startswith("{") and first.endswith("}"):
        try:
            is_object = isinstance(json.loads(first), dict)
        except (json.JSONDecodeError, RecursionError):
            is_object = False
        if is_object:
            print(
                f"faircalib: warning: {path.name} is read as plain text (its suffix is not "
                f"{', '.join(JSON_SUFFIXES)}), but its first line is a JSON object; rename it "
                ".jsonl to read one document per line",
                file=sys.stderr,
            )


def _utf8(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8-sig")  # a leading byte-order mark is not text
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}); convert it first") from exc


def plain_text_docs(text: str) -> tuple[str, ...]:
    """One document per block of text between blank lines (whitespace-only lines count as
    blank); surrounding whitespace is stripped and empty blocks are dropped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # Windows and old Mac endings
    blocks = re.split(r"\n[ \t\f\v]*\n", text)
    return tuple(b.strip() for b in blocks if b.strip())


def _json_docs(text: str, path: Path, field: str) -> tuple[str, ...]:
    """JSON Lines, or (a file starting with "[") one JSON array of objects or strings."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path} starts with '[' but is not one JSON array ({exc.msg}, line {exc.lineno}); "
                "fix it or write JSON Lines"
            ) from exc
        except RecursionError as exc:  # nesting deeper than Python's stack: not text records
            raise DataError(
                f"{path} nests JSON too deeply to be records of text; write one JSON object "
                "per line"
            ) from exc
        except ValueError as exc:  # a number past Python's 4300-digit int limit
            reason = str(exc).split(";")[0]  # not Python's advice to raise its limit
            raise DataError(f"{path} holds JSON this reader refuses ({reason}); fix it") from exc
        return tuple(
            item if isinstance(item, str) else _field(item, field, f"{path} item {number}")
            for number, item in enumerate(items)
        )
    docs = []
    # JSON Lines are separated by \n alone: splitlines() would also split inside strings at
    # U+2028, U+0085 and other characters JSON allows raw
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number} is not JSON ({exc.msg}); fix that line") from exc
        except RecursionError as exc:  # nesting deeper than Python's stack: not a text record
            raise DataError(f"{path} line {number} nests JSON too deeply; fix that line") from exc
        except ValueError as exc:  # a number past Python's 4300-digit int limit
            reason = str(exc).split(";")[0]  # not Python's advice to raise its limit
            raise DataError(f"{path} line {number}: {reason}; fix that line") from exc
        docs.append(_field(obj, field, f"{path} line {number}"))
    return tuple(docs)


CSV_FIELD_LIMIT = 2**31 - 1  # csv's default, 131,072 characters, is shorter than many documents


def _csv_docs(text: str, path: Path, field: str, delimiter: str) -> tuple[str, ...]:
    """One document per row of a CSV / TSV file with a header row: column `field`. Quoted
    cells are read strictly (a quote must close its cell), so a stray quote mark cannot
    silently swallow the rows after it or lose its marks. A TSV with such marks is plain
    text/tab-separated-values, which has no quoting: it is read again without. A row with more
    or fewer fields than the header is refused (a stray tab or comma, a missing cell)."""
    limit = csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        try:
            header, rows = _csv_rows(text, delimiter, csv.QUOTE_MINIMAL)
        except csv.Error as exc:
            if delimiter != "\t":
                raise DataError(f"{path} line {exc.args[1]}: {exc.args[0]}; fix that line") from exc
            header, rows = _csv_rows(text, delimiter, csv.QUOTE_NONE)
    except csv.Error as exc:
        raise DataError(f"{path} line {exc.args[1]}: {exc.args[0]}; fix that line") from exc
    finally:
        csv.field_size_limit(limit)
    if header is None:
        return ()
    if field not in header:
        raise DataError(
            f"{path} has no column {field!r} in its header (columns: {header}); use --text-field"
        )
    column = header.index(field)
    docs = []
    for number, row in enumerate(rows, 1):
        where = f"{path} row {number}"
        if len(row) != len(header):
            stray = "tab" if delimiter == "\t" else "delimiter"
            raise DataError(
                f"{where} has {len(row)} fields where the header has {len(header)} (a stray "
                f"{stray} or a missing field?); fix that row"
            )
        docs.append(_check_text(row[column], where, field))
    return tuple(docs)


def _csv_rows(text: str, delimiter: str, quoting: int) -> tuple[list[str] | None, list]:
    """(header, non-empty rows); a csv.Error's args are (message, line number)."""
    reader = csv.reader(
        io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True
    )
    try:
        table = [row for row in reader if row]
    except csv.Error as exc:
        raise csv.Error(str(exc), reader.line_num) from exc
    if not table:
        return None, []
    return table[0], table[1:]


def _field(obj: object, field: str, where: str) -> str:
    if not isinstance(obj, dict):
        raise DataError(f"{where} is not a JSON object with a {field!r} field; fix it")
    if field not in obj:
        raise DataError(f"{where} has no field {field!r} (fields: {sorted(obj)}); use --text-field")
    value = obj[field]
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {field!r} is {type(value).__name__}, not text; fix it or use "
            "another --text-field"
        )
    return valid_unicode(value, where)


def valid_unicode(value: str, where: str) -> str:
    """JSON may escape half of a surrogate pair alone (a cut emoji: "\\ud83d"); such a string
    has no UTF-8 form, and the tokenizer would fail on it later with a type error."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = ord(value[exc.start])
        raise DataError(
            f"{where}: its text holds U+{bad:04X}, half of a surrogate pair (not valid Unicode, "
            "e.g. a cut-off emoji escape); fix or drop that text"
        ) from exc
    return value


def _parquet_docs(path: Path, field: str) -> tuple[str, ...]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(f"reading Parquet ({path.name}) needs pyarrow: {DATA_EXTRA}") from exc
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid for non-Parquet bytes
        raise DataError(f"{path} is not a readable Parquet file ({exc}); check the file") from exc
    if field not in schema.names:
        raise DataError(
            f"{path} has no column {field!r} (columns: {schema.names}); use --text-field"
        )
    values = pq.read_table(path, columns=[field]).column(field).to_pylist()
    return tuple(_check_text(v, f"{path} row {i}", field) for i, v in enumerate(values))


def _check_text(value: object, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(
            f"{where}: column {field!r} is {type(value).__name__}, not text; use another "
            "--text-field"
        )
    return valid_unicode(value, where)


# --- the `datasets` library -------------------------------------------------------------------
def _datasets():
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"loading a `datasets` dataset needs the datasets package: {DATA_EXTRA}"
        ) from exc
    return datasets


def _datasets_dir(path: Path, split: str | None, field: str) -> TextSource:
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise DataError(
            f"{path} is a directory but not a dataset saved with save_to_disk; pass a file or "
            "such a directory"
        ) from exc
    table, split = _pick_split(loaded, split, str(path))
    docs = _dataset_docs(table, field, str(path))
    return TextSource(
        str(path), "datasets-dir", split, field, docs, directory_sha256(path), "directory files"
    )


@contextlib.contextmanager
def _quiet_hub_retries() -> Iterator[None]:
    """huggingface_hub logs a warning per retried request (offline: six of them, with the
    URL) before the failure, which becomes one DataError line; its errors still show."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


def _hub_dataset(name: str, split: str | None, field: str) -> TextSource:
    datasets = _datasets()
    try:
        with _quiet_hub_retries():
            loaded = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown, gated: one line either way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{name!r} is not a local file or directory, and loading it as a hub dataset failed "
            f"({first}); check the id or pass a local file"
        ) from exc
    # load_dataset(split=...) returns that split alone: a Dataset that keeps its name
    table, split = _pick_split(loaded, split, name, split_applied=split is not None)
    docs = _dataset_docs(table, field, name)
    return TextSource(name, "hub", split, field, docs, text_sha256(docs), "text")


def _pick_split(loaded, split: str | None, where: str, split_applied: bool = False):
    """A Dataset as-is; from a DatasetDict the requested split, or its only one."""
    if not hasattr(loaded, "keys"):  # a single Dataset
        if (
            split is not None and not split_applied
        ):  # else the records would name a split that was never chosen
            raise DataError(f"{where} is a single dataset: it has no splits (drop --split {split})")
        return loaded, split
    names = sorted(loaded.keys())
    if split is None and len(names) == 1:
        split = names[0]
    if split not in names:
        raise DataError(f"{where} has splits {names}; choose one with --split / --calib-split")
    return loaded[split], split


def _dataset_docs(table, field: str, where: str) -> tuple[str, ...]:
    if field not in table.column_names:
        raise DataError(
            f"{where} has no column {field!r} (columns: {table.column_names}); use --text-field"
        )
    return tuple(_check_text(v, f"{where} row {i}", field) for i, v in enumerate(table[field]))


def directory_sha256(path: Path) -> str:
    """sha256 over the data files below `path`: relative path and bytes, in sorted path order.
    Left out: hidden files (.DS_Store, editor state) and `datasets`' own caches
    (cache-*.arrow, written beside the data by .map() and friends): they change nothing the
    documents hold, and would make a replay wrongly warn that its data changed."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and _is_data_file(p, path)):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def _is_data_file(file: Path, root: Path) -> bool:
    parts = file.relative_to(root).parts
    hidden = any(part.startswith(".") for part in parts)
    return not hidden and not (file.name.startswith("cache-") and file.suffix == ".arrow")


def text_sha256(docs: tuple[str, ...]) -> str:
    """sha256 of the documents, each followed by a NUL byte (no file to hash: hub data)."""
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(doc.encode("utf-8") + b"\0")
    return digest.hexdigest()
