"""Everything bnflow says to MLflow, in one subpackage.

- ``uri``: which tracking store, its credentials, whether it answers, where a person looks.
- ``runs``: the parent run of a pipeline run and one nested child per stage (``Tracker``).
- ``epochs``: per-epoch metrics sent from the driver while training runs (``EpochLogger``).
- ``served``: the model bnflow logs (raw rows in, probabilities out).
- ``registry``: the champion gate.

Stages never touch MLflow. Two commands make runs of their own beside these: ``search``'s driver
creates one run per trial with the tracker's client (``pipeline.search.rounds``), and ``adapt``
logs its one run with MLflow's fluent API (``pipeline.adapt``); both log models through ``served``.
"""
