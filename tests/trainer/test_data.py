"""Datasets: every file type and record format is read, and every bad dataset fails once, with exit code 2.

Good data is checked at the level of the rows the Trainer gets (tokens, labels, packing). Bad
data goes through ``kubetune train`` itself (in this process, for speed; the exit code through a
real process is checked once), and the message must name what is wrong.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kubetune_api import ALLOW_LOCAL_PATHS, DatasetSpec
from kubetune_trainer.errors import EXIT_PERMANENT, PermanentError
from kubetune_trainer.toy import toy_facts, toy_records, write_jsonl
from kubetune_trainer.training.data import collate, load, pipeline
from kubetune_trainer.training.launch import main as train_main
from kubetune_trainer.training.preflight import main as preflight_main
from tests.trainer.conftest import finetunejob, train_command, train_env, write_manifest

pytestmark = pytest.mark.trainer

FORMATS = ["prompt-completion", "text", "instruction", "messages"]


def spec(source: Path, **fields: Any) -> DatasetSpec:
    return DatasetSpec.model_validate(
        {"source": str(source), "maxSeqLength": 32, **fields}, context={ALLOW_LOCAL_PATHS: True}
    )


def write_as(records: list[dict[str, Any]], path: Path) -> Path:
    """``records`` in the file type ``path``'s suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        return write_jsonl(records, path)
    if path.suffix == ".json":
        path.write_text(json.dumps(records), encoding="utf-8")
    elif path.suffix == ".csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
        path.write_text(out.getvalue(), encoding="utf-8")
    elif path.suffix == ".parquet":
        import pyarrow as pa  # noqa: PLC0415
        import pyarrow.parquet as pq  # noqa: PLC0415

        pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.mark.parametrize(
    ("fmt", "suffix"),
    # A CSV cell holds text, not a list of messages, so chats come as JSON, JSON lines or Parquet.
    [(f, s) for f in FORMATS for s in (".jsonl", ".json", ".csv", ".parquet") if (f, s) != ("messages", ".csv")],
)
def test_every_file_type_and_format_is_read(fmt: str, suffix: str, toy_tokenizer: Any, tmp_path: Path) -> None:
    records = toy_records(fmt)
    path = write_as(records, tmp_path / f"train{suffix}")
    result = pipeline.prepare(path, toy_tokenizer, spec(path), seed=0)
    assert result.stats.format == fmt
    assert result.stats.train_examples == len(records) == 58
    row = result.train[0]
    decoded = toy_tokenizer.decode(
        [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    )
    answer = next(iter(toy_facts().values()))
    if fmt == "text":
        assert decoded.startswith("question : what is the color")  # the loss is on every token (but the first)
    else:
        assert decoded.replace("</s>", "").split() == answer.split()  # the loss is on the answer (and EOS) only


def test_completion_only_loss_can_be_turned_off(toy_tokenizer: Any, tmp_path: Path) -> None:
    path = write_jsonl(toy_records("prompt-completion"), tmp_path / "train.jsonl")
    on = pipeline.prepare(path, toy_tokenizer, spec(path), seed=0).stats
    off = pipeline.prepare(path, toy_tokenizer, spec(path, completionOnlyLoss=False), seed=0).stats
    assert on.train_loss_tokens == 3 * 58  # two answer words and EOS
    assert off.train_loss_tokens == off.train_tokens - 58  # all but each example's first token


def test_a_saved_dataset_dict_with_a_named_validation_split(toy_tokenizer: Any, tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict  # noqa: PLC0415

    records = toy_records("messages")
    DatasetDict({"train": Dataset.from_list(records[:50]), "validation": Dataset.from_list(records[50:])}).save_to_disk(
        str(tmp_path / "saved")
    )
    result = pipeline.prepare(
        tmp_path / "saved", toy_tokenizer, spec(tmp_path / "saved", validation={"split": "validation"}), seed=0
    )
    assert (result.stats.train_examples, result.stats.eval_examples) == (50, 8)
    assert result.eval is not None
    assert len(result.eval) == 8


def test_a_folder_of_split_files_and_a_validation_fraction(toy_tokenizer: Any, tmp_path: Path) -> None:
    records = toy_records("instruction")
    write_jsonl(records[:40], tmp_path / "data" / "train.jsonl")
    write_jsonl(records[40:], tmp_path / "data" / "validation.jsonl")
    named = pipeline.prepare(
        tmp_path / "data", toy_tokenizer, spec(tmp_path / "data", validation={"split": "validation"}), seed=0
    )
    assert (named.stats.train_examples, named.stats.eval_examples) == (40, 18)
    fraction = pipeline.prepare(
        tmp_path / "data", toy_tokenizer, spec(tmp_path / "data", validation={"fraction": 0.25}), seed=0
    )
    assert (fraction.stats.train_examples, fraction.stats.eval_examples) == (30, 10)


def test_packing_fills_rows_and_restarts_positions(toy_tokenizer: Any, tmp_path: Path) -> None:
    import random  # noqa: PLC0415

    rng = random.Random(0)
    records = [{"text": " ".join(str(rng.randrange(1000)) for _ in range(rng.randrange(3, 60)))} for _ in range(300)]
    path = write_jsonl(records, tmp_path / "short.jsonl")
    plain = pipeline.prepare(path, toy_tokenizer, spec(path, maxSeqLength=128), seed=0)
    packed = pipeline.prepare(path, toy_tokenizer, spec(path, maxSeqLength=128, packing=True), seed=0)
    assert packed.stats.train_tokens == plain.stats.train_tokens
    assert sum(len(r) for r in packed.train["input_ids"]) == plain.stats.train_tokens
    assert max(len(r) for r in packed.train["input_ids"]) <= 128
    assert packed.stats.train_rows < plain.stats.train_rows / 3
    assert packed.stats.packing_efficiency > 0.95
    assert sum(packed.train["num_examples"]) == 300
    row = packed.train[0]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    assert len(starts) == row["num_examples"] > 1
    assert all(row["labels"][i] == -100 for i in starts)  # no example learns from the one before it
    batch = collate.Collator(toy_tokenizer.pad_token_id)([packed.train[0], packed.train[-1]])
    assert "attention_mask" not in batch
    assert batch["position_ids"].shape == batch["input_ids"].shape
    assert int(batch["num_tokens"]) == len(packed.train[0]["input_ids"]) + len(packed.train[-1]["input_ids"])


def test_truncation_is_counted(toy_tokenizer: Any, tmp_path: Path) -> None:
    records = [{"text": " ".join(["7"] * n)} for n in (5, 10, 40, 80)]
    path = write_jsonl(records, tmp_path / "mixed.jsonl")
    stats = pipeline.prepare(path, toy_tokenizer, spec(path, maxSeqLength=20), seed=0).stats
    assert (stats.truncated, stats.dropped, stats.max_length) == (2, 0, 20)


# ------------------------------------------------------------------------------- bad datasets


def _bytes(content: bytes) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        path = folder / "train.jsonl"
        path.write_bytes(content)
        return path

    return write


def _lines(*records: Any, name: str = "train.jsonl") -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        path = folder / name
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
        return path

    return write


def _missing(folder: Path) -> Path:
    return folder / "nowhere.jsonl"


def _broken_parquet(folder: Path) -> Path:
    path = folder / "train.parquet"
    path.write_bytes(b"PAR1 this is not really parquet")
    return path


def _no_validation_split(folder: Path) -> Path:
    return write_jsonl(toy_records("text"), folder / "data" / "train.jsonl").parent


GOOD = {"prompt": "question : what is", "completion": " red big"}

#: name → (dataset writer, extra spec fields, words the error must contain)
BAD: dict[str, tuple[Callable[[Path], Path], dict[str, Any], list[str]]] = {
    "empty": (_bytes(b""), {}, ["empty"]),
    "only-blank-lines": (_bytes(b"\n\n  \n"), {}, ["empty"]),
    "wrong-columns": (
        _lines({"question": "q", "answer": "a"}),
        {},
        ["cannot tell the format", "'question'", "'answer'"],
    ),
    "broken-json-line": (_lines(GOOD, '{"prompt": "x", "completion": ', GOOD), {}, ["line 2", "not valid JSON"]),
    "not-utf8": (_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"text": "caf\xe9"}\n'), {}, ["not UTF-8", "line 2"]),
    "all-too-long": (_lines(*[{"text": " ".join(["7"] * 50)}] * 5), {}, ["maxSeqLength", "every one of the 5"]),
    "line-not-an-object": (_lines(GOOD, [1, 2, 3]), {}, ["line 2", "not an object"]),
    "missing-file": (_missing, {}, ["does not exist"]),
    "format-mismatch": (_lines(GOOD), {"format": "messages"}, ["format messages needs", "'messages'", "prompt"]),
    "bad-role": (_lines({"messages": [{"role": "bot", "content": "hi"}]}), {}, ["example 1", "role", "'bot'"]),
    "no-assistant-turn": (_lines({"messages": [{"role": "user", "content": "hi"}]}), {}, ["no assistant turn"]),
    "empty-completion": (_lines(GOOD, {"prompt": "p", "completion": "  "}), {}, ["example 2", "'completion' is empty"]),
    "number-not-text": (_lines({"text": 42}), {}, ["'text' is int"]),
    "broken-parquet": (_broken_parquet, {}, ["not a readable Parquet"]),
    "missing-validation-split": (
        _no_validation_split,
        {"validation": {"split": "validation"}},
        ["no data for split 'validation'"],
    ),
    "unknown-file-type": (_lines("just some words", name="train.txt"), {}, ["cannot tell the file type"]),
}


def command_args(config: Path, output: Path) -> argparse.Namespace:
    """The parsed arguments of ``kubetune train`` (and ``preflight --keep``) for ``config`` into ``output``."""
    return argparse.Namespace(
        config=str(config),
        output=str(output),
        keep=True,
        nnodes=None,
        node_rank=0,
        nproc_per_node=None,
        master_addr="127.0.0.1",
        master_port=None,
        metrics_port=None,
    )


@pytest.mark.parametrize("case", list(BAD))
def test_bad_dataset_exits_2_naming_the_problem(
    case: str, toy_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    writer, dataset_fields, words = BAD[case]
    dataset = writer(tmp_path)
    manifest = finetunejob(toy_model, dataset, dataset={"source": str(dataset), **dataset_fields})
    config = write_manifest(tmp_path, manifest)
    message_file = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_MESSAGE_PATH", str(message_file))
    assert train_main(command_args(config, tmp_path / "out")) == EXIT_PERMANENT
    message = message_file.read_text()
    for word in words:
        assert word in message, f"{case}: {word!r} not in {message!r}"
    assert "spec.dataset" in message
    assert not (tmp_path / "out" / "checkpoints").exists(), "no training may start on bad data"


@pytest.mark.parametrize("case", list(BAD))
def test_the_preflight_refuses_bad_data_with_the_message_training_gives(
    case: str, toy_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, dataset_fields, _ = BAD[case]
    dataset = writer(tmp_path)
    config = write_manifest(
        tmp_path, finetunejob(toy_model, dataset, dataset={"source": str(dataset), **dataset_fields})
    )
    messages = {}
    for command, run in (("preflight", preflight_main), ("train", train_main)):
        message_file = tmp_path / f"{command}-termination-log"
        monkeypatch.setenv("KUBETUNE_TERMINATION_MESSAGE_PATH", str(message_file))
        assert run(command_args(config, tmp_path / command)) == EXIT_PERMANENT, command
        messages[command] = message_file.read_text()
    assert messages["preflight"] == messages["train"]
    assert not list((tmp_path / "preflight").glob(".preflight/*")), "nothing is kept of data that failed"


def test_bad_data_exit_code_of_the_real_command(toy_model: Path, tmp_path: Path) -> None:
    dataset = _lines({"question": "q", "answer": "a"})(tmp_path)
    config = write_manifest(tmp_path, finetunejob(toy_model, dataset))
    env = train_env(KUBETUNE_TERMINATION_MESSAGE_PATH=str(tmp_path / "termination-log"))
    result = subprocess.run(
        train_command(config, tmp_path / "out"),
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "spec.dataset.format: cannot tell the format from the columns ['question', 'answer']" in result.stderr
    assert "cannot tell the format" in (tmp_path / "termination-log").read_text()


def test_problems_of_one_kind_are_listed_together(tmp_path: Path) -> None:
    path = _lines(GOOD, "{broken", "[1]", GOOD, "{", "nope", "{", "{", "{")(tmp_path)
    with pytest.raises(PermanentError) as raised:
        load.read_file(path)
    assert len(raised.value.problems) == 6  # five of the seven bad lines named, then the rest counted
    assert "and 2 more bad lines" in str(raised.value)
