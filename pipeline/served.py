"""The name models registered before 2026-12-01 give their class: ``pipeline.served.ServedClassifier``.

A registered model is a cloudpickle of its class by reference (module path and name). The class now
lives in ``pipeline.tracking.served``; this module keeps the old path answering, so every champion
registered by an earlier bnflow still loads in a process that has today's code imported (the
champion gate rescores it in the run's driver). ``tests/integration/test_legacy_model.py`` holds
such a model. Remove it only with a migration of the registered models.
"""

from pipeline.tracking.served import ServedClassifier

__all__ = ["ServedClassifier"]
