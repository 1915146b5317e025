"""Typed artifacts that stages hand each other; the runner records them in stage manifests.

Two of them are files with a body of their own, and this module is the only place that knows their
shape: ``NormStats`` (``norm_stats.json``, written by normalize) and ``CheckpointState``
(``checkpoint.pt``, written by train and recalibrate). Each has ``save``/``load`` with a version
check; a checkpoint holds plain Python types and tensors only, so it loads with
``torch.load(weights_only=True)`` and a checkpoint file cannot run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from schemas.errors import DataError

NORM_STATS_VERSION = "1"
CHECKPOINT_VERSION = "2"


class _Artifact(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitInfo(_Artifact):
    path: str = Field(description="Directory of Parquet files for this split.")
    rows: int = Field(description="Row count.")
    digest: str = Field(description="sha256 over the full content of every Parquet file, in name order.")
    files: list[str] = Field(default_factory=list, description=(
        "The split's Parquet files (names under path), in order: what readers read. Empty in a manifest "
        "written before 2026-12-01, whose readers list path instead."))


class Dataset(_Artifact):
    """A set of splits sharing one Arrow schema."""

    splits: dict[str, SplitInfo]
    num_features: int
    num_classes: int
    image_shape: Optional[tuple[int, int, int]] = None
    feature_names: Optional[list[str]] = Field(
        None, description="A wide table's feature columns, in feature order; the served model takes them by name.")
    features_column: str = Field("features", description="The source's list column of features (data.features_column); "
                                                        "what the served model and adapt call a row's features.")
    class_names: Optional[list[str]] = Field(None, description="A name per class in label order; unset: the label numbers.")

    def split(self, name: str) -> SplitInfo:
        return self.splits[name]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example as networks take it: (C, H, W) for images, (D,) for tabular rows."""
        return tuple(self.image_shape) if self.image_shape else (self.num_features,)


class NormStatsFile(_Artifact):
    path: str = Field(description="JSON file with the fitted normalization statistics.")
    version: str = Field(description="Content hash of the statistics.")


class Checkpoint(_Artifact):
    path: str = Field(description="A checkpoint file (CheckpointState).")
    digest: str = Field(description="sha256 of the file.")
    epoch: int = Field(description="Epochs completed when it was written.")
    bn_mode: str = Field(description="BatchNorm mode the weights were trained with.")


class Weights(_Artifact):
    """A warm start's tensors (train.model.weights), as the train stage reads them."""

    path: str = Field(description="A state dict or bnflow checkpoint file: a local path or a URI pyarrow.fs reads.")
    digest: str = Field(description="sha256 of the file: a changed file is a different input.")
    source: str = Field(description="What train.model.weights named (a path, URI or MLflow model URI).")


class TrainHistory(_Artifact):
    path: str = Field(description="JSON list of per-epoch metric dicts.")
    epochs: list[dict[str, float]]
    stop_reason: Optional[str] = Field(None, description="Why training stopped before train.epochs (early stopping).")
    best_epoch: Optional[int] = Field(None, description="Epoch of the lowest val loss; its weights are the trained checkpoint under early stopping.")


class Evaluation(_Artifact):
    metrics: dict[str, float]
    tags: dict[str, str] = Field(default_factory=dict, description="Run tags (the curve reading); empty for an older manifest.")
    files: list[str] = Field(description="Plots and reports to attach to the run.")


# -- file bodies -----------------------------------------------------------------------------------

def write_atomic(path: str | Path, write) -> None:
    """The one way bnflow replaces a file that another process may read (artifacts, manifests,
    progress, trial outcomes): ``write(tmp_path)`` into a temporary file beside ``path``, then a
    rename over it, so a reader sees the old file or the whole new one. ``write`` may be a string
    (written as text).

    Where a directory of files is published, its manifest is the file written last with this: the
    commit of the directory (``pipeline.runner``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(write, str):
        tmp.write_text(write)
    else:
        write(tmp)
    os.replace(tmp, path)


def _versioned(body, key: str, expected: str, path, fix: str) -> dict:
    """``body`` if it is a mapping whose ``key`` is ``expected``.

    Raises:
        DataError: naming the file, the version found and the fix.
    """
    found = body.get(key) if isinstance(body, dict) else None
    if found != expected:
        raise DataError(f"{path}: {key} {found!r}, expected {expected!r} (written by another bnflow version?); {fix}")
    return body


class NormStats(_Artifact):
    """Normalization statistics fitted on the train split: ``x_norm = (x - shift) / scale``."""

    schema_version: str = Field(NORM_STATS_VERSION, description="Layout version of this file.")
    method: str = Field(description="standard, minmax or none.")
    per: str = Field(description="feature or channel: the unit the statistics were computed over.")
    image_shape: Optional[list[int]] = Field(None, description="(C, H, W) of image rows, else null.")
    num_features: int
    count: float = Field(description="Train rows the statistics were fitted on (after dropped rows).")
    mean: list[float] = Field(description="Per unit (feature or channel).")
    std: list[float] = Field(description="Per unit: population standard deviation.")
    min: list[float]
    max: list[float]
    constant_units: list[int] = Field(description="Units with zero spread on train: centred, not scaled.")
    shift: list[float] = Field(description="Per feature, ready to apply.")
    scale: list[float] = Field(description="Per feature, ready to apply (never 0).")
    config_hash: str = Field(description="Hash of the normalize config that produced these.")
    version: str = Field(description="Content hash of everything above.")
    dropped_rows: dict[str, int] = Field(default_factory=dict, description="Rows with NaN/inf dropped, per split.")

    def save(self, path: Path) -> None:
        write_atomic(Path(path), lambda p: p.write_text(self.model_dump_json(indent=1)))

    @classmethod
    def load(cls, path: str | Path) -> "NormStats":
        """The one way to read statistics.

        Raises:
            DataError: an unreadable file or one of another layout version.
        """
        try:
            body = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read normalization statistics ({e}); rerun the normalize stage") from None
        return cls.model_validate(_versioned(body, "schema_version", NORM_STATS_VERSION, path, "rerun the normalize stage"))


class ModelSpec(_Artifact):
    """What a checkpoint's network was built for."""

    num_features: int
    num_classes: int
    image_shape: Optional[tuple[int, int, int]] = None
    feature_names: Optional[list[str]] = None  # a wide table's columns: the served model's input names
    features_column: str = "features"  # else the list column the source called a row's features
    class_names: Optional[list[str]] = None  # the served model's names of its outputs; unset: label numbers

    def names(self) -> list[str]:
        return self.class_names or [str(i) for i in range(self.num_classes)]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example as the network takes it: (C, H, W) for images, (D,) for tabular rows."""
        return tuple(self.image_shape) if self.image_shape else (self.num_features,)


class Network(_Artifact):
    """A network as built: the import path and every keyword argument, so a checkpoint is rebuilt
    from itself (``tasks.nn.network.construct``)."""

    class_path: str = Field(description="'package.module:Name' of the class or function that built it.")
    init_args: dict[str, Any] = Field(description="Its keyword arguments, those bnflow passed (num_classes, ...) included.")


class CheckpointState(_Artifact):
    """Everything a checkpoint file holds. Tensors only in ``model`` and the optimizer/scheduler/RNG
    states; everything else plain types.

    A train checkpoint carries what resuming needs (optimizer, scheduler and RNG state, history);
    a recalibrated one drops the optimizer and records how it was recalibrated.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    version: str = Field(CHECKPOINT_VERSION, description="Layout version of this file.")
    epoch: int = Field(description="Epochs completed.")
    config: dict[str, Any] = Field(description="The train config (JSON form) the weights were trained with.")
    bn_mode: str
    spec: ModelSpec
    norm_stats: NormStats = Field(description="Statistics the inputs were normalized with; the served model applies them.")
    network: Optional[Network] = Field(None, description="How to rebuild the network; unset in checkpoints written "
                                                          "before 2026-12-01 (rebuilt from config['model']).")
    model: dict[str, Any] = Field(description="Plain-BatchNorm state dict (tensors).")
    optimizer: Optional[dict[str, Any]] = None
    scheduler: Optional[dict[str, Any]] = None
    rng: Optional[dict[str, Any]] = Field(None, description="torch RNG state at the end of the epoch.")
    history: list[dict[str, float]] = Field(default_factory=list, description="Per-epoch metrics up to ``epoch``.")
    recalibration: Optional[dict[str, Any]] = Field(None, description="recalibrate: rows and split used.")
    best_model: Optional[dict[str, Any]] = Field(
        None, description="train with early stopping: the state dict of the lowest-val-loss epoch so far (tensors).")
    stop_reason: Optional[str] = Field(None, description="train: why it stopped before train.epochs.")

    def save(self, path: Path) -> None:
        import torch

        body = self.model_dump(exclude={"spec", "norm_stats", "network"})
        body["spec"] = self.spec.model_dump(mode="json")
        body["norm_stats"] = self.norm_stats.model_dump(mode="json")
        body["network"] = self.network.model_dump(mode="json") if self.network else None
        write_atomic(Path(path), lambda p: torch.save(body, p))

    @classmethod
    def load(cls, path: str | Path) -> "CheckpointState":
        """Read a checkpoint with ``weights_only=True``.

        Raises:
            DataError: an unreadable file or one of another layout version.
        """
        import pickle

        import torch

        try:
            body = torch.load(path, weights_only=True, map_location="cpu")
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{path}: not a readable bnflow checkpoint ({first}); rerun the stage that wrote it") from None
        return cls.model_validate(_versioned(body, "version", CHECKPOINT_VERSION, path, "rerun the stage that wrote it"))
