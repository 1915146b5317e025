"""``python -m pipeline adapt``: a logged model's BN statistics re-estimated on the user's unlabeled data (AdaBN).

Li et al. (2016): when the inputs a deployed model meets have shifted, re-estimating every BN
layer's statistics on rows of the new distribution -- no label, no gradient -- recovers much of the
lost accuracy. The logged model takes RAW features and carries its training normalization inside;
that normalization is applied as it is (never refitted), so only the BN statistics move. The adapted
model is logged as a new MLflow run that links to the source run, and optionally registered.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from schemas.errors import DataError, UserError

DEFAULT_ROWS = 10_000


@dataclass(frozen=True)
class Adapted:
    run_id: str
    experiment_id: str
    model_uri: str
    rows: int
    version: Optional[str]


@dataclass(frozen=True)
class Source:
    """A logged bnflow model as adapt reads it."""

    module: Any  # raw rows -> logits, with real BatchNorm layers (NormalizedClassifier)
    class_names: Optional[list[str]]
    info: Any  # MLflow's ModelInfo
    checkpoint: Optional[str]  # local path of the bnflow checkpoint stored in the model; None for earlier models
    feature_names: Optional[list[str]]  # a wide table's columns, else None
    features_column: str  # else the list column of a row's features


def load_source(model_uri: str) -> Source:
    """The model at ``model_uri``, downloaded once: its module, names, checkpoint and input columns.

    Raises:
        UserError: the URI does not resolve to a bnflow model in the tracking store, or the model
            holds no network to adapt (logged without a checkpoint).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import served

    try:
        # One download: an alias (models:/NAME@champion) that moves meanwhile cannot mix two models.
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri)
        model, class_names, info = served.load(local)
    except (MlflowException, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--model {model_uri}: cannot load it ({first}); give a logged bnflow model, e.g. "
                        "runs:/RUN_ID/model_recalibrated or models:/NAME@ALIAS") from None
    if not hasattr(model, "model") or not hasattr(model, "shift"):
        raise UserError(f"--model {model_uri}: not a bnflow model with its network (raw features in, normalization "
                        "inside); a model adapted from one logged by an earlier bnflow has none: adapt that source model")
    feature_names, column = served.inputs(info)
    return Source(model, class_names, info, served.checkpoint_path(local), feature_names, column)


def read_sample(data_dir: str, feature_names: Optional[list[str]], num_features: int, column: str,
                rows: Optional[int], batch_size: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """The calibration rows of the Parquet files under ``data_dir``: a seeded random sample of
    ``rows`` (default 10,000 or all), as raw features (n, num_features) float32 in calibration
    order, and the batch bounds (``tasks.recalibrate.batch_plan``, the recalibrate stage's plan).
    Reads the files' footers, then only the row groups that hold sampled rows (a file written as one
    row group, pyarrow's default for small files, is read whole). Labels are never read. A model logged from a wide table takes its columns by
    name; otherwise one list column (``column``) holds each row's features.

    Raises:
        DataError: no Parquet file or no row, a missing column, a wrong feature count, more rows
            asked for than exist, or sampled rows holding NaN or inf.
    """
    from tasks.reader import Split, list_parquet
    from tasks.recalibrate import batch_plan

    if not Path(data_dir).is_dir():
        raise DataError(f"--data {data_dir}: not a directory; give the directory holding the new rows as Parquet files")
    files = list_parquet(data_dir)
    if not files:
        raise DataError(f"--data {data_dir}: no .parquet file in it; write the new rows there as Parquet")
    for f in files:
        names = Split([f]).schema.names
        if feature_names:
            missing = [c for c in feature_names if c not in names]
            if missing:
                raise DataError(f"{f}: lacks feature column '{missing[0]}' the model was trained with; "
                                f"the model takes columns {feature_names[:5]}{'...' if len(feature_names) > 5 else ''}")
        elif column not in names:
            raise DataError(f"{f}: no '{column}' column; the model takes one list column '{column}' of {num_features} "
                            f"features per row (columns here: {names[:6]})")
    split = Split(files)
    if rows is not None and rows < 2:
        raise DataError(f"--rows {rows}: BN statistics need at least 2 rows; raise --rows or leave it unset")
    if rows is not None and rows > split.rows:
        raise DataError(f"--rows {rows}: {data_dir} holds only {split.rows} rows; lower --rows or leave it unset")
    n = rows if rows is not None else min(DEFAULT_ROWS, split.rows)
    if n < 2:
        raise DataError(f"--data {data_dir}: {n} row(s); BN statistics need at least 2 rows")
    plan = batch_plan([split.rows], n, batch_size, seed)
    order, starts = plan["order"], np.cumsum([0, *split.file_rows])
    x = np.empty((n, num_features), dtype=np.float32)
    for i, f in enumerate(files):  # file by file: each file's own column types, cast to float32
        pick = np.nonzero((order >= starts[i]) & (order < starts[i + 1]))[0]
        if len(pick):
            table = Split([f]).take(order[pick] - starts[i], columns=feature_names or [column])
            x[pick] = _features(table, f, feature_names, num_features, column)
    if not np.isfinite(x).all():
        raise DataError(f"--data {data_dir}: {int((~np.isfinite(x)).any(axis=1).sum())} of the {n} sampled row(s) hold "
                        "NaN or inf; clean or drop them")
    return x, plan["bounds"]


def _features(table, where: str, feature_names: Optional[list[str]], num_features: int, column: str) -> np.ndarray:
    """A table's rows as (n, num_features) float32: the named columns of a wide table, or the list
    column ``column``.

    Raises:
        DataError: a row with another number of features (naming ``where``).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if feature_names:
        return np.column_stack([pc.cast(table.column(c), pa.float32()).to_numpy(zero_copy_only=False) for c in feature_names])
    col = table.column(column).combine_chunks()
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if lengths.min() != num_features or lengths.max() != num_features:
        bad = int(lengths[lengths != num_features][0])
        raise DataError(f"{where}: rows of {bad} features in '{column}'; the model takes {num_features}")
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, num_features)


def adapt(model_uri: str, data_dir: str, register: Optional[str] = None, rows: Optional[int] = None,
          batch_size: int = 256, seed: int = 0, experiment: Optional[str] = None) -> Adapted:
    """Re-estimate ``model_uri``'s BN statistics (estimator ``exact``) on rows of ``data_dir`` and log
    the result as a new run. ``rows``: a seeded random sample (default 10,000 or all when fewer).

    Raises:
        UserError: a model that does not load, data that breaks the contract, more rows than exist.
    """
    import copy
    import tempfile

    import mlflow
    import torch

    from pipeline.tracking import served
    from pipeline.tracking.uri import source_tags
    from schemas.artifacts import CheckpointState
    from tasks.nn.bn_stats import update_bn_stats

    src = load_source(model_uri)
    source, info = src.module, src.info
    num_features = int(source.shift.numel())
    x, b = read_sample(data_dir, src.feature_names, num_features, src.features_column, rows, batch_size, seed)
    n = len(x)
    rows_in_order = torch.from_numpy(np.require(x, requirements="W"))
    model = copy.deepcopy(source)
    update_bn_stats(model, (rows_in_order[b[i]:b[i + 1]] for i in range(len(b) - 1)))
    model.eval()

    client = mlflow.MlflowClient()
    src_run = client.get_run(info.run_id) if info.run_id else None
    experiment_id = (mlflow.set_experiment(experiment).experiment_id if experiment
                     else src_run.info.experiment_id if src_run else mlflow.set_experiment("bnflow").experiment_id)
    tags = {**source_tags(), "bnflow.stage": "adapt", "bnflow.adapted_from_model": model_uri,
            "bnflow.adapted_from_run": info.run_id or "",
            "mlflow.note.content": f"BN statistics of {model_uri} re-estimated on {n} unlabeled rows of {data_dir} (AdaBN)."}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"adapt-{Path(data_dir).name}", tags=tags) as run, \
            tempfile.TemporaryDirectory() as tmp:
        mlflow.log_params({"adapt.model": model_uri, "adapt.data": str(Path(data_dir).resolve()), "adapt.rows": n,
                           "adapt.batch_size": batch_size, "adapt.seed": seed, "adapt.estimator": "exact"})
        checkpoint = None
        if src.checkpoint is not None:  # the source's checkpoint with the adapted statistics: adaptable again
            state = CheckpointState.load(src.checkpoint)
            checkpoint = str(Path(tmp) / "checkpoint.pt")
            state.model_copy(update={"model": model.model.state_dict()}).save(checkpoint)
        # MLflow prints "Successfully registered model ..." itself; the caller says it once.
        with contextlib.redirect_stderr(io.StringIO()):
            names = src.class_names or [str(i) for i in range(int(model(torch.zeros(2, num_features)).shape[1]))]
            logged = served.log(model, "model_adapted", names, src.feature_names, register, checkpoint=checkpoint,
                                features_column=src.features_column)
    version = str(logged.registered_model_version) if register and getattr(logged, "registered_model_version", None) else None
    return Adapted(run.info.run_id, experiment_id, f"runs:/{run.info.run_id}/model_adapted", n, version)


def command(args) -> int:
    """``python -m pipeline adapt``: check the flags and the store, adapt, say where the result is."""
    import time

    import mlflow

    from pipeline.tracking.uri import check_reachable, default_tracking_uri, ui_command
    from schemas.errors import ConfigError
    from tasks.console import Console

    say = Console().say

    for flag, value, low in (("--rows", args.rows, 2), ("--batch-size", args.batch_size, 2)):
        if value is not None and value < low:
            raise ConfigError(f"{flag} {value}: must be at least {low}")
    uri = default_tracking_uri(args.tracking_uri)
    check_reachable(uri)
    check_store_exists(uri)
    mlflow.set_tracking_uri(uri)  # MLflow's process-wide store for this command (model loading reads it)
    t0 = time.perf_counter()
    done = adapt(args.model, args.data, register=args.register, rows=args.rows, batch_size=args.batch_size,
                 seed=args.seed, experiment=args.experiment)
    say(f"adapted {args.model} on {done.rows} rows of {args.data} in {time.perf_counter() - t0:.0f}s")
    print(f"  model: {done.model_uri}" + (f"  (registered as {args.register} version {done.version})" if done.version else ""))
    print(f"  MLflow run: {done.run_id}")
    print(f"  {'see it at' if uri.startswith('http') else 'see it with'}: {ui_command(uri, done.experiment_id, done.run_id)}", flush=True)
    return 0


def check_store_exists(uri: str) -> None:
    """A local sqlite store that does not exist holds no model to adapt: say so instead of creating
    an empty database (MLflow creates one on first use).

    Raises:
        UserError: naming the path and the fix.
    """
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.exists():
            raise UserError(f"tracking store {uri}: no such database, so no model to adapt; give --tracking-uri (or "
                            "MLFLOW_TRACKING_URI) of the store the model was logged to")
