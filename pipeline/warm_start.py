"""``train.model.weights``: the warm start a run's train stage reads, resolved once on the driver.

A file (a local path or a URI ``pyarrow.fs`` reads) is read where it is; a logged bnflow model
(``runs:/...``, ``models:/NAME@alias``, ``models:/m-...``) is fetched through MLflow and its network's
state dict written into the run's directory, where every node's workers read it. Either way the
stage receives a ``schemas.artifacts.Weights`` whose digest enters the train stage's cache key.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

from schemas.artifacts import Weights, write_atomic
from schemas.errors import ModelError

MLFLOW_SCHEMES = ("runs:/", "models:/")
FILE = "warm_start.pt"


def given(cfg, root: Path) -> dict:
    """``{"weights": Weights or None}``: what the runner hands the train stage (``runner.run(given=...)``).

    Raises:
        ModelError: an MLflow model that cannot be loaded, or a file that cannot be read.
    """
    uri = cfg.train.model.weights
    if uri is None:
        return {"weights": None}
    if uri.startswith(MLFLOW_SCHEMES):
        import torch

        from pipeline.tracking import served

        state = served.network_weights(uri)
        path = root / FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda p: torch.save(state, p))
        return {"weights": Weights(path=str(path), digest=_digest(str(path)), source=uri)}
    return {"weights": Weights(path=uri, digest=_digest(uri), source=uri)}


def _digest(uri: str) -> str:
    import pyarrow.fs as pafs

    h = hashlib.sha256()
    try:
        fs, path = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), str(Path(uri).resolve()))
        with fs.open_input_stream(path) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except (OSError, ValueError) as e:
        raise ModelError(f"train.model.weights={uri}: cannot read it ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                         "give an existing file, a URI pyarrow.fs reads, or runs:/RUN_ID/model_recalibrated") from None
    return h.hexdigest()


def is_mlflow_uri(uri: Optional[str]) -> bool:
    return bool(uri) and uri.startswith(MLFLOW_SCHEMES)
