"""Everything that can be checked before a model is loaded, done once per node before the workers start.

``kubetune train`` runs this in the launching process: the config's combinations, the sources
(located and then fetched), the model folder's layout, the tokenizer, and the whole dataset
(read, checked, tokenized, split and packed). Every problem found in one stage is reported
together, and a bad dataset fails here, once, with exit code 2, rather than in every worker.
The tokenized data is saved to a folder that the workers memory-map, so they start training
straight away and all read exactly the same rows in the same order.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from kubetune_api import TrainerConfig
from kubetune_trainer import fetch
from kubetune_trainer.config_file import load_config, render
from kubetune_trainer.errors import ProblemList
from kubetune_trainer.training.data import pipeline
from kubetune_trainer.training.data.tokenize import DataStats

log = logging.getLogger("kubetune.train")

PREPARED_FILE: Final = "prepared.json"
CONFIG_FILE: Final = "config.json"


@dataclass(frozen=True, slots=True)
class PreparedRun:
    """What the training processes need, all on local disk."""

    folder: Path
    """The prepared folder: config.json, prepared.json, train/ and eval/."""
    model_dir: Path
    """The base model's folder."""
    stats: DataStats
    """What the data turned into."""

    @property
    def train_dir(self) -> Path:
        """The tokenized training rows (a saved ``datasets.Dataset``)."""
        return self.folder / "train"

    @property
    def eval_dir(self) -> Path | None:
        """The tokenized evaluation rows, if there are any."""
        folder = self.folder / "eval"
        return folder if folder.exists() else None

    @classmethod
    def load(cls, folder: Path) -> tuple[TrainerConfig, PreparedRun]:
        """The config and prepared run saved in ``folder`` by :func:`prepare_run`."""
        config = load_config(folder / CONFIG_FILE)
        saved: dict[str, Any] = json.loads((folder / PREPARED_FILE).read_text(encoding="utf-8"))
        return config, cls(folder=folder, model_dir=Path(saved["model_dir"]), stats=DataStats(**saved["stats"]))


def log_combination(config: TrainerConfig, *, cuda: bool) -> None:
    """Say where this run does what the spec asks differently (combinations that cannot run at all,
    such as 8-bit weights under ZeRO-3, are refused by the spec's RULES at admission)."""
    spec = config.spec
    if not cuda and spec.training.optimizer == "paged-adamw-8bit":
        log.info("paged-adamw-8bit pages optimizer state between GPU and host; on a CPU it behaves as adamw-8bit")
    if spec.output.destination and not spec.output.destination.startswith("pvc://"):
        log.info(
            "publishing to %s is done by a later step; this run leaves the files in %s",
            spec.output.destination,
            config.mounts.output,
        )


def prepare_run(config: TrainerConfig, folder: Path, *, cuda: bool) -> PreparedRun:
    """Check everything, fetch the sources and tokenize the data into ``folder``; raise PermanentError on any problem."""
    from kubetune_trainer.training.model import check_model, load_tokenizer  # noqa: PLC0415 - imports transformers

    spec = config.spec
    problems = ProblemList()
    log_combination(config, cuda=cuda)
    model_at = fetch.locate(
        spec.model.source, kind="model", secret_ref=spec.model.secret_ref, config=config, problems=problems
    )
    data_at = fetch.locate(
        spec.dataset.source, kind="dataset", secret_ref=spec.dataset.secret_ref, config=config, problems=problems
    )
    problems.raise_if_any("the job's config cannot run")
    if model_at is None or data_at is None:  # for mypy: each None was recorded as a problem just above
        raise AssertionError

    cache = fetch.cache_dir(config)
    fetched: dict[str, Path] = {}
    for kind, located in (("model", model_at), ("dataset", data_at)):
        try:
            fetched[kind] = fetch.fetch(located, cache=cache)
        except fetch.FetchError as exc:
            if not exc.permanent:
                raise
            problems.add(f"spec.{kind}.source", str(exc))
    problems.raise_if_any("a source cannot be fetched")
    model_dir, data_path = fetched["model"], fetched["dataset"]

    check_model(model_dir, spec, problems)
    problems.raise_if_any("the model does not fit the spec")
    tokenizer = load_tokenizer(model_dir, spec)
    tokenized = pipeline.prepare(data_path, tokenizer, spec.dataset, seed=spec.training.seed)
    log.info(
        pipeline.describe(tokenized.stats, max_seq_length=spec.dataset.max_seq_length, packing=spec.dataset.packing)
    )

    folder.mkdir(parents=True, exist_ok=True)
    tokenized.train.save_to_disk(str(folder / "train"))
    if tokenized.eval is not None:
        tokenized.eval.save_to_disk(str(folder / "eval"))
    (folder / CONFIG_FILE).write_text(render(config), encoding="utf-8")
    (folder / PREPARED_FILE).write_text(
        json.dumps({"model_dir": str(model_dir), "stats": tokenized.stats.as_dict()}, indent=2), encoding="utf-8"
    )
    return PreparedRun(folder=folder, model_dir=model_dir, stats=tokenized.stats)
