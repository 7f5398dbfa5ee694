"""Reading a dataset's records: JSONL, JSON, CSV and Parquet files, folders of split files, saved datasets.

Every reader names the file and the line of what it cannot read, and lists the first few problems
of each kind (:data:`SHOWN`) before "… and N more", as a :class:`PermanentError`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Final

from kubetune_trainer.errors import PermanentError, ProblemList

#: One record (example) as read from the source, column → value.
Record = dict[str, Any]

DATA_SUFFIXES: Final = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
#: How many problems of one kind are listed before "… and N more".
SHOWN: Final = 5
#: The field that problems with the data itself are reported against.
SOURCE_FIELD: Final = "spec.dataset.source"


def more_problems(problems: ProblemList, count: int, what: str) -> None:
    """Record "… and N more ``what``" when ``count`` problems of one kind exceed the :data:`SHOWN` ones."""
    if count > SHOWN:
        problems.add(SOURCE_FIELD, f"… and {count - SHOWN} more {what}")


def _line_of(text: bytes, offset: int) -> int:
    return text.count(b"\n", 0, offset) + 1


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PermanentError.one(
            SOURCE_FIELD,
            f"{path.name} is not UTF-8 text (invalid byte 0x{raw[exc.start]:02x} at offset {exc.start}, "
            f"line {_line_of(raw, exc.start)}); convert the file to UTF-8",
            summary="the dataset cannot be read",
        ) from None
    if not text.strip():
        raise PermanentError.one(
            SOURCE_FIELD, f"{path.name} is empty: it holds no examples", summary="the dataset cannot be read"
        )
    return text.removeprefix("\ufeff")


def _read_jsonl(path: Path, text: str) -> list[Record]:
    records: list[Record] = []
    problems = ProblemList()
    bad = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            bad += 1
            if bad <= SHOWN:
                problems.add(
                    SOURCE_FIELD,
                    f"{path.name} line {number} is not valid JSON ({exc.msg} at column {exc.colno}); fix or remove the line",
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
        records.append(value)
    more_problems(problems, bad, "bad lines")
    problems.raise_if_any("the dataset cannot be read")
    return records


def _read_json(path: Path, text: str) -> list[Record]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.lineno > 1 and text.lstrip().startswith("{"):
            return _read_jsonl(path, text)  # JSON lines saved as .json
        raise PermanentError.one(
            SOURCE_FIELD,
            f"{path.name} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})",
            summary="the dataset cannot be read",
        ) from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        value = lists[0] if len(lists) == 1 else [value]  # {"data": [...]} or a single example
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise PermanentError.one(
            SOURCE_FIELD, f"{path.name} must hold a JSON list of example objects", summary="the dataset cannot be read"
        )
    return value


def _read_csv(path: Path, text: str) -> list[Record]:
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or any(not name for name in reader.fieldnames):
        raise PermanentError.one(
            SOURCE_FIELD, f"{path.name} has no header row naming its columns", summary="the dataset cannot be read"
        )
    records: list[Record] = []
    problems = ProblemList()
    bad = 0
    for row in reader:
        if None in row or any(v is None for v in row.values()):
            bad += 1
            if bad <= SHOWN:
                problems.add(
                    SOURCE_FIELD,
                    f"{path.name} line {reader.line_num} has {'more' if None in row else 'fewer'} fields than the header ({len(reader.fieldnames)})",
                )
            continue
        records.append(dict(row))
    more_problems(problems, bad, "bad rows")
    problems.raise_if_any("the dataset cannot be read")
    return records


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq  # noqa: PLC0415 - only Parquet sources need it

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise PermanentError.one(
            SOURCE_FIELD, f"{path.name} is not a readable Parquet file ({exc})", summary="the dataset cannot be read"
        ) from None
    records: list[Record] = table.to_pylist()
    return records


def read_file(path: Path) -> list[Record]:
    """The records of one JSONL, JSON, CSV or Parquet file (chosen by suffix, else by content)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet" or path.read_bytes()[:4] == b"PAR1":
        records = _read_parquet(path)
    else:
        text = _decode(path)
        if suffix in (".jsonl", ".ndjson"):
            records = _read_jsonl(path, text)
        elif suffix == ".json":
            records = _read_json(path, text)
        elif suffix == ".csv":
            records = _read_csv(path, text)
        elif text.lstrip().startswith(("{", "[")):
            records = _read_json(path, text)
        else:
            raise PermanentError.one(
                SOURCE_FIELD,
                f"cannot tell the file type of {path.name}; use a .jsonl, .json, .csv or .parquet file",
                summary="the dataset cannot be read",
            )
    if not records:
        raise PermanentError.one(SOURCE_FIELD, f"{path.name} holds no examples", summary="the dataset cannot be read")
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
    records: list[Record] = []
    for file in files:
        records.extend(read_file(file))
    return records


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
        rows: list[Record] = saved[split].to_list()
    elif split == "train":
        rows = saved.to_list()
    else:
        raise PermanentError.one(
            "spec.dataset.validation.split",
            f"{path} is a single saved split; it has no split {split!r}",
            summary="the dataset cannot be read",
        )
    if not rows:
        raise PermanentError.one(
            SOURCE_FIELD, f"split {split!r} of {path} holds no examples", summary="the dataset cannot be read"
        )
    return rows
