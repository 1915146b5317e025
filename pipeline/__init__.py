"""bnflow's driver side: the DAG, its runner, the CLI, tracking and search."""

import os

# MLflow's telemetry client fetches its config in a background thread and, when that fails (a
# cluster without internet access, or a refused host), deletes _MLFLOW_TELEMETRY_SESSION_ID from
# os.environ; a tracking request made at that moment iterates os.environ (requests' proxy lookup)
# and fails with KeyError. Off unless the user sets MLFLOW_DISABLE_TELEMETRY=false.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
