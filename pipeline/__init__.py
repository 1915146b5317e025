"""bnflow's driver side.

- ``cli``: the command line (parse, dispatch, exit codes).
- ``session``: a tracked run's life (checks, lease, Ray, MLflow parent run, signals); ``quiet``:
  the process-wide settings a command makes before it imports a library.
- ``run``, ``adapt``, ``search/``, ``jobs/`` (submit, schedule): the commands.
- ``dag`` and ``runner``: the stages, declared once, and their walk; ``lease``: one owner per run id.
- ``tracking/``: everything said to MLflow; ``cluster``: connecting to Ray; ``recipes/``: the shipped recipes.

Importing this package sets nothing: a serving process that loads a logged model imports it too.
"""
