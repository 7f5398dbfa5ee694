"""Everything that can be checked before a model is loaded, done once per node before the workers start.

``kubetune train`` runs this in the launching process: the config's combinations, the sources
(located and then fetched), the model folder's layout, the tokenizer, and the whole dataset
(read, checked, tokenized, split and packed). Every problem found in one stage is reported
together, and a bad dataset fails here, once, with exit code 2, rather than in every worker.
The tokenized data is saved to a folder that the workers memory-map, so they start training
straight away and all read exactly the same rows in the same order.

The pre-flight (:mod:`.preflight`) runs the same stages on a CPU before any GPU node exists and,
when the job's volume is shared, leaves the tokenized data in ``<output>/.preflight/<key>``, where
the key is a digest of everything the data depends on (the model, whose tokenizer it is, the
dataset section and the seed of the split); training then reuses that folder instead of fetching
and tokenizing the dataset again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from kubetune_api import TrainerConfig
from kubetune_trainer import fetch
from kubetune_trainer.config_file import load_config, render
from kubetune_trainer.errors import ProblemList
from kubetune_trainer.fetch import Located
from kubetune_trainer.training.data import pipeline
from kubetune_trainer.training.data.tokenize import DataStats

log = logging.getLogger("kubetune.train")

PREPARED_FILE: Final = "prepared.json"
CONFIG_FILE: Final = "config.json"
#: The folder of the job's output volume where the pre-flight leaves the tokenized data.
PREFLIGHT_FOLDER: Final = ".preflight"
#: Bumped whenever the tokenized rows change shape, so that an old folder is never reused.
_DATA_FORMAT: Final = 1


@dataclass(frozen=True, slots=True)
class PreparedRun:
    """What the training processes need, all on local disk."""

    folder: Path
    """The prepared folder: config.json and prepared.json (and train/ and eval/ unless reused)."""
    model_dir: Path
    """The base model's folder."""
    stats: DataStats
    """What the data turned into."""
    data_folder: Path | None = None
    """Where train/ and eval/ are when they were reused from the pre-flight; ``folder`` otherwise."""

    @property
    def train_dir(self) -> Path:
        """The tokenized training rows (a saved ``datasets.Dataset``)."""
        return (self.data_folder or self.folder) / "train"

    @property
    def eval_dir(self) -> Path | None:
        """The tokenized evaluation rows, if there are any."""
        folder = (self.data_folder or self.folder) / "eval"
        return folder if folder.exists() else None

    @classmethod
    def load(cls, folder: Path) -> tuple[TrainerConfig, PreparedRun]:
        """The config and prepared run saved in ``folder`` by :func:`prepare_run`."""
        config = load_config(folder / CONFIG_FILE)
        saved: dict[str, Any] = json.loads((folder / PREPARED_FILE).read_text(encoding="utf-8"))
        data = saved.get("data_dir")
        return config, cls(
            folder=folder,
            model_dir=Path(saved["model_dir"]),
            stats=DataStats(**saved["stats"]),
            data_folder=Path(data) if data else None,
        )


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


def data_key(config: TrainerConfig) -> str:
    """A digest of everything the tokenized data depends on: the model (its tokenizer), the dataset section, the seed."""
    spec = config.spec
    basis = {
        "format": _DATA_FORMAT,
        "model": spec.model.model_dump(mode="json", by_alias=True),
        "dataset": spec.dataset.model_dump(mode="json", by_alias=True),
        "seed": spec.training.seed,
    }
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:20]


def kept_data_dir(config: TrainerConfig) -> Path:
    """Where the pre-flight keeps the tokenized data of ``config`` on the job's volume."""
    return Path(config.mounts.output) / PREFLIGHT_FOLDER / data_key(config)


def locate_sources(
    config: TrainerConfig, problems: ProblemList, *, dataset: bool = True
) -> dict[fetch.SourceKind, Located]:
    """Where the model and (unless ``dataset`` is false) the dataset are; every problem recorded is raised together."""
    spec = config.spec
    found: dict[fetch.SourceKind, Located | None] = {
        "model": fetch.locate(
            spec.model.source, kind="model", secret_ref=spec.model.secret_ref, config=config, problems=problems
        )
    }
    if dataset:
        found["dataset"] = fetch.locate(
            spec.dataset.source, kind="dataset", secret_ref=spec.dataset.secret_ref, config=config, problems=problems
        )
    problems.raise_if_any("the job's config cannot run")
    # Each None was recorded as a problem just above.
    return {kind: located for kind, located in found.items() if located is not None}


def fetch_sources(
    config: TrainerConfig, wanted: dict[fetch.SourceKind, Located], problems: ProblemList, *, weights: bool = True
) -> dict[fetch.SourceKind, Path]:
    """The ``wanted`` sources fetched to local paths; a permanent failure is raised as a problem of its field."""
    cache = fetch.cache_dir(config)
    fetched: dict[fetch.SourceKind, Path] = {}
    for kind, located in wanted.items():
        try:
            fetched[kind] = fetch.fetch(located, cache=cache, weights=weights)
        except fetch.FetchError as exc:
            if not exc.permanent:
                raise
            problems.add(f"spec.{kind}.source", str(exc))
    problems.raise_if_any("a source cannot be fetched")
    return fetched


def tokenize_into(config: TrainerConfig, model_dir: Path, data_path: Path, folder: Path) -> DataStats:
    """The dataset read, checked, tokenized, split and packed as training will, saved into ``folder``."""
    from kubetune_trainer.training.model import load_tokenizer  # noqa: PLC0415 - imports transformers

    spec = config.spec
    tokenizer = load_tokenizer(model_dir, spec)
    tokenized = pipeline.prepare(data_path, tokenizer, spec.dataset, seed=spec.training.seed)
    log.info(
        pipeline.describe(tokenized.stats, max_seq_length=spec.dataset.max_seq_length, packing=spec.dataset.packing)
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenized.train.save_to_disk(str(folder / "train"))
    if tokenized.eval is not None:
        tokenized.eval.save_to_disk(str(folder / "eval"))
    return tokenized.stats


def keep_data(config: TrainerConfig, model_dir: Path, data_path: Path) -> tuple[Path, DataStats]:
    """Tokenize into :func:`kept_data_dir`, written whole or not at all (a staging folder renamed into place)."""
    target = kept_data_dir(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide it from a training pod running as another user
    try:
        stats = tokenize_into(config, model_dir, data_path, staging)
        (staging / PREPARED_FILE).write_text(json.dumps({"stats": stats.as_dict()}, indent=2), encoding="utf-8")
        if target.exists():  # an earlier pre-flight of the same data (a retried Job)
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target, stats


def kept_data(config: TrainerConfig) -> tuple[Path, DataStats] | None:
    """The tokenized data the pre-flight left for ``config``, when it is there (complete: it is renamed into place)."""
    folder = kept_data_dir(config)
    try:
        saved: dict[str, Any] = json.loads((folder / PREPARED_FILE).read_text(encoding="utf-8"))
        stats = DataStats(**saved["stats"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (folder, stats) if (folder / "train").is_dir() else None


def prepare_run(config: TrainerConfig, folder: Path, *, cuda: bool) -> PreparedRun:
    """Check everything, fetch the sources and tokenize the data into ``folder``; raise PermanentError on any problem.

    With ``config.reuse_prepared_data`` (the operator's word that the pre-flight passed and kept it),
    the data the pre-flight left on the job's volume is reused: the dataset is neither fetched nor
    tokenized again.
    """
    from kubetune_trainer.training.model import check_model  # noqa: PLC0415 - imports transformers

    spec = config.spec
    problems = ProblemList()
    log_combination(config, cuda=cuda)
    kept = kept_data(config) if config.reuse_prepared_data else None
    if config.reuse_prepared_data and kept is None:
        log.info("data: the pre-flight's tokenized data is not in %s; preparing it again", kept_data_dir(config))
    fetched = fetch_sources(config, locate_sources(config, problems, dataset=kept is None), problems)
    model_dir = fetched["model"]

    check_model(model_dir, spec, problems)
    problems.raise_if_any("the model does not fit the spec")
    folder.mkdir(parents=True, exist_ok=True)
    if kept is not None:
        data_folder, stats = kept
        log.info("data: reusing what the pre-flight tokenized in %s", data_folder)
        log.info(pipeline.describe(stats, max_seq_length=spec.dataset.max_seq_length, packing=spec.dataset.packing))
    else:
        data_folder, stats = folder, tokenize_into(config, model_dir, fetched["dataset"], folder)
    (folder / CONFIG_FILE).write_text(render(config), encoding="utf-8")
    (folder / PREPARED_FILE).write_text(
        json.dumps({"model_dir": str(model_dir), "data_dir": str(data_folder), "stats": stats.as_dict()}, indent=2),
        encoding="utf-8",
    )
    return PreparedRun(folder=folder, model_dir=model_dir, stats=stats, data_folder=data_folder)
