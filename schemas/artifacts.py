"""Typed artifacts that stages hand each other; the runner records them in stage manifests."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


class _Artifact(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitInfo(_Artifact):
    path: str = Field(description="Directory of Parquet files for this split.")
    rows: int = Field(description="Row count.")
    digest: str = Field(description="sha256 over the full content of every Parquet file, in name order.")


class Dataset(_Artifact):
    """A set of splits sharing one Arrow schema."""

    splits: dict[str, SplitInfo]
    num_features: int
    num_classes: int
    image_shape: Optional[tuple[int, int, int]] = None
    schema_fields: list[str] = Field(default_factory=list, description="'name: type' of each field.")

    def split(self, name: str) -> SplitInfo:
        return self.splits[name]


class NormStatsFile(_Artifact):
    path: str = Field(description="JSON file with the fitted normalization statistics.")
    version: str = Field(description="Content hash of the statistics.")


class Checkpoint(_Artifact):
    path: str = Field(description="A torch checkpoint file: model state, optimizer state, config, normalization stats.")
    epoch: int = Field(description="Epochs completed when it was written.")
    bn_mode: str = Field(description="BatchNorm mode the weights were trained with.")


class TrainHistory(_Artifact):
    path: str = Field(description="JSON list of per-epoch metric dicts.")
    epochs: list[dict[str, float]]


class Evaluation(_Artifact):
    metrics: dict[str, float]
    files: list[str] = Field(description="Plots and reports to attach to the run.")
