"""Reading a dataset's records: JSONL, JSON, CSV and Parquet files, folders of split files, saved datasets.

Every reader names the file and the line of what it cannot read, and lists the first few problems
of each kind (:data:`SHOWN`) before "… and N more", as a :class:`PermanentError`.

A dataset comes from whoever wrote the job, and a split is held in memory whole, so what is read is
bounded, and a dataset beyond a bound is refused (exit code 2, naming the file and the line)
instead of exhausting the pod's memory, which would fail the same way on every restart:

- a JSONL line, and a CSV line, of at most :data:`MAX_LINE_BYTES` (64 MiB). JSONL and CSV files
  are read line by line, and a longer line is refused once 64 MiB of it have been read, so no
  more than that is ever held before a line is parsed;
- a JSON file, which is parsed whole, of at most :data:`MAX_DOCUMENT_BYTES` (1 GiB); a larger file
  of JSON lines saved as ``.json`` is read as JSONL;
- at most :data:`MAX_RECORDS` (5,000,000) records per split, counted as they are read, and taken
  from a Parquet file's footer and a saved dataset's metadata before reading;
- at most :data:`MAX_SPLIT_BYTES` (16 GiB) of data per split: the files' sizes, a Parquet file's
  uncompressed size, a saved dataset's size in memory.

A JSON value nested too deeply, or an integer of thousands of digits, is a line that is not valid JSON.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, TextIO

from kubetune_trainer.errors import PermanentError, ProblemList

#: One record (example) as read from the source, column → value.
Record = dict[str, Any]

DATA_SUFFIXES: Final = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
#: How many problems of one kind are listed before "… and N more".
SHOWN: Final = 5
#: The field that problems with the data itself are reported against.
SOURCE_FIELD: Final = "spec.dataset.source"
#: Longest line of a JSONL or CSV file, in bytes (characters, for CSV): 64 MiB.
MAX_LINE_BYTES: Final = 64 << 20
#: Largest JSON file, which is parsed whole: 1 GiB.
MAX_DOCUMENT_BYTES: Final = 1 << 30
#: Most records in one split.
MAX_RECORDS: Final = 5_000_000
#: Most bytes of data in one split: 16 GiB.
MAX_SPLIT_BYTES: Final = 16 << 30

_UNREADABLE: Final = "the dataset cannot be read"
_TOO_LARGE: Final = "the dataset is too large"
_BOM: Final = b"\xef\xbb\xbf"
_HEAD_BYTES: Final = 1 << 16


def _size(count: int) -> str:
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if count >= 1 << shift and count % (1 << shift) == 0:
            return f"{count >> shift} {unit}"
    return f"{count:,} bytes"


def more_problems(problems: ProblemList, count: int, what: str) -> None:
    """Record "… and N more ``what``" when ``count`` problems of one kind exceed the :data:`SHOWN` ones."""
    if count > SHOWN:
        problems.add(SOURCE_FIELD, f"… and {count - SHOWN} more {what}")


def _line_of(text: bytes, offset: int) -> int:
    return text.count(b"\n", 0, offset) + 1


def _too_many(path: Path, limit: int) -> PermanentError:
    return PermanentError.one(
        SOURCE_FIELD,
        f"{path.name} brings the split above {MAX_RECORDS:,} records, the most a job reads "
        f"({limit:,} were left for this file); use a sample of the data, or several jobs",
        summary=_TOO_LARGE,
    )


def _long_line(path: Path, number: int) -> PermanentError:
    return PermanentError.one(
        SOURCE_FIELD,
        f"{path.name} line {number} is longer than {_size(MAX_LINE_BYTES)}, the most one line may hold; "
        "check that the file has one example per line, and shorten or split the example",
        summary=_TOO_LARGE,
    )


def _decode(path: Path) -> str:
    """The whole text of a JSON file (at most :data:`MAX_DOCUMENT_BYTES`)."""
    size = path.stat().st_size
    if size > MAX_DOCUMENT_BYTES:
        raise PermanentError.one(
            SOURCE_FIELD,
            f"{path.name} is {size:,} bytes, more than the {_size(MAX_DOCUMENT_BYTES)} a JSON file may hold "
            "(it is parsed whole); save the examples as JSON lines (.jsonl), one object per line",
            summary=_TOO_LARGE,
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PermanentError.one(
            SOURCE_FIELD,
            f"{path.name} is not UTF-8 text (invalid byte 0x{raw[exc.start]:02x} at offset {exc.start}, "
            f"line {_line_of(raw, exc.start)}); convert the file to UTF-8",
            summary=_UNREADABLE,
        ) from None
    del raw
    if not text.strip():
        raise PermanentError.one(SOURCE_FIELD, f"{path.name} is empty: it holds no examples", summary=_UNREADABLE)
    return text.removeprefix("\ufeff")


def _lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """``(line number, offset, bytes)`` of each line of ``path``, never reading more than one bounded line."""
    with open(path, "rb") as source:
        number = offset = 0
        while line := source.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                raise _long_line(path, number)
            yield number, offset, line
            offset += len(line)


def _parse_line(text: str) -> tuple[Any, str | None]:
    """The JSON value of one line, or why it is not valid JSON."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"{exc.msg} at column {exc.colno}"
    except RecursionError:
        return None, "nested too deeply"
    except ValueError as exc:  # an integer of more digits than Python converts
        return None, str(exc).split(";")[0]


def _read_jsonl(path: Path, *, room: int) -> list[Record]:
    records: list[Record] = []
    problems = ProblemList()
    bad = 0
    blank = True
    for number, offset, line in _lines(path):
        if number == 1:
            line = line.removeprefix(_BOM)  # noqa: PLW2901 - the byte-order mark is not part of the data
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PermanentError.one(
                SOURCE_FIELD,
                f"{path.name} is not UTF-8 text (invalid byte 0x{line[exc.start]:02x} at offset {offset + exc.start}, "
                f"line {number}); convert the file to UTF-8",
                summary=_UNREADABLE,
            ) from None
        if not text.strip():
            continue
        blank = False
        value, error = _parse_line(text)
        if error is not None:
            bad += 1
            if bad <= SHOWN:
                problems.add(
                    SOURCE_FIELD, f"{path.name} line {number} is not valid JSON ({error}); fix or remove the line"
                )
            continue
        if not isinstance(value, dict):
            bad += 1
            if bad <= SHOWN:
                problems.add(
                    SOURCE_FIELD,
                    f"{path.name} line {number} is a JSON {type(value).__name__}, not an object; each line must be one example object",
                )
            continue
        if len(records) >= room:
            raise _too_many(path, room)
        records.append(value)
    if blank:
        raise PermanentError.one(SOURCE_FIELD, f"{path.name} is empty: it holds no examples", summary=_UNREADABLE)
    more_problems(problems, bad, "bad lines")
    problems.raise_if_any(_UNREADABLE)
    return records


def _first_line_is_an_object(path: Path) -> bool:
    try:
        _, _, line = next(_lines(path))
    except (StopIteration, PermanentError):
        return False
    value, _ = _parse_line(line.removeprefix(_BOM).decode("utf-8", "replace"))
    return isinstance(value, dict)


def _read_json(path: Path, *, room: int) -> list[Record]:
    if path.stat().st_size > MAX_DOCUMENT_BYTES and _first_line_is_an_object(path):
        return _read_jsonl(path, room=room)  # JSON lines saved as .json
    text = _decode(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.lineno > 1 and text.lstrip().startswith("{"):
            del text
            return _read_jsonl(path, room=room)  # JSON lines saved as .json
        raise PermanentError.one(
            SOURCE_FIELD,
            f"{path.name} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})",
            summary=_UNREADABLE,
        ) from None
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0]
        raise PermanentError.one(
            SOURCE_FIELD, f"{path.name} is not valid JSON ({reason})", summary=_UNREADABLE
        ) from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        value = lists[0] if len(lists) == 1 else [value]  # {"data": [...]} or a single example
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise PermanentError.one(
            SOURCE_FIELD, f"{path.name} must hold a JSON list of example objects", summary=_UNREADABLE
        )
    if len(value) > room:
        raise _too_many(path, room)
    return value


def _bounded_lines(source: TextIO, path: Path) -> Iterator[str]:
    number = 0
    while line := source.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(line) > MAX_LINE_BYTES and not line.endswith(("\n", "\r")):
            raise _long_line(path, number)
        yield line


def _read_csv(path: Path, *, room: int) -> list[Record]:
    csv.field_size_limit(MAX_LINE_BYTES)
    records: list[Record] = []
    problems = ProblemList()
    bad = 0
    with open(path, encoding="utf-8-sig", newline="") as source:
        reader = csv.DictReader(_bounded_lines(source, path))
        try:
            if not reader.fieldnames or any(not name for name in reader.fieldnames):
                raise PermanentError.one(
                    SOURCE_FIELD, f"{path.name} has no header row naming its columns", summary=_UNREADABLE
                )
            for row in reader:
                if None in row or any(v is None for v in row.values()):
                    bad += 1
                    if bad <= SHOWN:
                        problems.add(
                            SOURCE_FIELD,
                            f"{path.name} line {reader.line_num} has {'more' if None in row else 'fewer'} fields than the header ({len(reader.fieldnames)})",
                        )
                    continue
                if len(records) >= room:
                    raise _too_many(path, room)
                records.append(dict(row))
        except UnicodeDecodeError:
            raise PermanentError.one(
                SOURCE_FIELD,
                f"{path.name} is not UTF-8 text (near line {reader.line_num + 1}); convert the file to UTF-8",
                summary=_UNREADABLE,
            ) from None
        except csv.Error as exc:
            raise PermanentError.one(
                SOURCE_FIELD, f"{path.name} line {reader.line_num} is not valid CSV ({exc})", summary=_UNREADABLE
            ) from None
    more_problems(problems, bad, "bad rows")
    problems.raise_if_any(_UNREADABLE)
    return records


def _read_parquet(path: Path, *, room: int) -> list[Record]:
    import pyarrow.parquet as pq  # noqa: PLC0415 - only Parquet sources need it

    try:
        metadata = pq.ParquetFile(path).metadata
        rows = int(metadata.num_rows)
        size = sum(int(metadata.row_group(i).total_byte_size) for i in range(metadata.num_row_groups))
    except Exception as exc:
        raise PermanentError.one(
            SOURCE_FIELD, f"{path.name} is not a readable Parquet file ({exc})", summary=_UNREADABLE
        ) from None
    if rows > room:
        raise _too_many(path, room)
    if size > MAX_SPLIT_BYTES:
        raise PermanentError.one(
            SOURCE_FIELD,
            f"{path.name} holds {size:,} bytes uncompressed, more than the {_size(MAX_SPLIT_BYTES)} a split may",
            summary=_TOO_LARGE,
        )
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise PermanentError.one(
            SOURCE_FIELD, f"{path.name} is not a readable Parquet file ({exc})", summary=_UNREADABLE
        ) from None
    records: list[Record] = table.to_pylist()
    return records


def read_file(path: Path, *, room: int | None = None) -> list[Record]:
    """The records of one JSONL, JSON, CSV or Parquet file (chosen by suffix, else by content).

    At most ``room`` records are read (:data:`MAX_RECORDS` by default); more is a :class:`PermanentError`.
    """
    room = MAX_RECORDS if room is None else room
    suffix = path.suffix.lower()
    with open(path, "rb") as source:
        head = source.read(_HEAD_BYTES)
    if suffix != ".parquet" and not head.removeprefix(_BOM).strip() and path.stat().st_size <= len(head):
        raise PermanentError.one(SOURCE_FIELD, f"{path.name} is empty: it holds no examples", summary=_UNREADABLE)
    if suffix == ".parquet" or head[:4] == b"PAR1":
        records = _read_parquet(path, room=room)
    elif suffix in (".jsonl", ".ndjson"):
        records = _read_jsonl(path, room=room)
    elif suffix == ".json":
        records = _read_json(path, room=room)
    elif suffix == ".csv":
        records = _read_csv(path, room=room)
    elif head.removeprefix(_BOM).lstrip().startswith((b"{", b"[")):
        records = _read_json(path, room=room)
    else:
        raise PermanentError.one(
            SOURCE_FIELD,
            f"cannot tell the file type of {path.name}; use a .jsonl, .json, .csv or .parquet file",
            summary=_UNREADABLE,
        )
    if not records:
        raise PermanentError.one(SOURCE_FIELD, f"{path.name} holds no examples", summary=_UNREADABLE)
    return records


def _split_files(folder: Path, split: str) -> list[Path]:
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES and not p.name.startswith(".")
    )
    named = [
        p
        for p in files
        if p.stem == split or p.stem.startswith((f"{split}-", f"{split}_", f"{split}.")) or p.parent.name == split
    ]
    if named:
        return named
    return files if split == "train" and len(files) == 1 else []


def _splits_in(folder: Path) -> list[str]:
    names = {
        p.stem.split("-")[0].split("_")[0].split(".")[0] for p in folder.rglob("*") if p.suffix.lower() in DATA_SUFFIXES
    }
    return sorted(names)


def read_split(path: Path, split: str) -> list[Record]:
    """The records of ``split`` in ``path``: a data file (split ``train``), a folder of split files, or a saved Hugging Face dataset."""
    if path.is_file():
        if split != "train":
            raise PermanentError.one(
                "spec.dataset.validation.split",
                f"{path.name} is a single file and has no split {split!r}; use dataset.validation.fraction, or a folder with {split}.jsonl",
                summary="the dataset cannot be read",
            )
        _check_split_size([path])
        return read_file(path)
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return _read_saved(path, split)
    files = _split_files(path, split)
    if not files:
        raise PermanentError.one(
            "spec.dataset.validation.split" if split != "train" else SOURCE_FIELD,
            f"{path} has no data for split {split!r} (found splits: {_splits_in(path) or 'none'}); "
            f"name the files {split}.jsonl (or .json/.csv/.parquet)",
            summary="the dataset cannot be read",
        )
    _check_split_size(files)
    records: list[Record] = []
    for file in files:
        records.extend(read_file(file, room=MAX_RECORDS - len(records)))
    return records


def _check_split_size(files: list[Path]) -> None:
    total = 0
    for file in files:
        total += file.stat().st_size
        if total > MAX_SPLIT_BYTES:
            raise PermanentError.one(
                SOURCE_FIELD,
                f"the files of the split add up to more than {_size(MAX_SPLIT_BYTES)} (at {file.name}), the most a "
                "job reads; use a sample of the data, or several jobs",
                summary=_TOO_LARGE,
            )


def _read_saved(path: Path, split: str) -> list[Record]:
    from datasets import DatasetDict, load_from_disk  # noqa: PLC0415

    try:
        saved = load_from_disk(str(path))
    except Exception as exc:
        raise PermanentError.one(
            SOURCE_FIELD, f"{path} is not a readable saved dataset ({exc})", summary="the dataset cannot be read"
        ) from None
    if isinstance(saved, DatasetDict):
        if split not in saved:
            raise PermanentError.one(
                "spec.dataset.validation.split" if split != "train" else "spec.dataset.split",
                f"the dataset has no split {split!r}; it has {sorted(saved)}",
                summary="the dataset cannot be read",
            )
        chosen = saved[split]
    elif split == "train":
        chosen = saved
    else:
        raise PermanentError.one(
            "spec.dataset.validation.split",
            f"{path} is a single saved split; it has no split {split!r}",
            summary="the dataset cannot be read",
        )
    if chosen.num_rows > MAX_RECORDS or chosen.data.nbytes > MAX_SPLIT_BYTES:
        raise PermanentError.one(
            SOURCE_FIELD,
            f"split {split!r} of {path} holds {chosen.num_rows:,} records ({chosen.data.nbytes:,} bytes), more than "
            f"the {MAX_RECORDS:,} records or {_size(MAX_SPLIT_BYTES)} a job reads; use a sample of the data",
            summary=_TOO_LARGE,
        )
    rows: list[Record] = chosen.to_list()
    if not rows:
        raise PermanentError.one(
            SOURCE_FIELD, f"split {split!r} of {path} holds no examples", summary="the dataset cannot be read"
        )
    return rows
