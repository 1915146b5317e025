"""``python -m pipeline search``: hyperparameter search the way the course teaches it.

- ``space``: distributions of searched fields, seeded sampling, coarse-to-fine narrowing.
- ``plan``: the space checked against the config, rounds, seeds, trial configs, ranking.
- ``rounds``: the driver: data stages once, rounds of trials on Ray Tune, the winner finished.
- ``trial``: what runs inside one Tune trial.
- ``report``: the search's record on its MLflow parent run.
- ``command``: the command's life around them.
"""
