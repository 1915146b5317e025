"""Everything bnflow says to MLflow, in one subpackage.

- ``uri``: which tracking store, its credentials, whether it answers, where a person looks.
- ``runs``: the parent run of a pipeline run and one nested child per stage (``Tracker``).
- ``epochs``: per-epoch metrics sent from the driver while training runs (``EpochLogger``).
- ``served``: the model bnflow logs (raw rows in, probabilities out).
- ``registry``: the champion gate.

Stages never touch MLflow. The commands that make runs of their own (``search`` for its trials,
``adapt`` for an adapted model) do it through these modules.
"""
