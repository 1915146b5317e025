"""User-facing errors: the CLI prints their message as one line and exits with code 2 (a
``ServiceUnavailable``: exit code 1, the run can be retried as it is)."""


class UserError(Exception):
    """Bad input from the user (config, data, files). The message names the field or file, the bad
    value and the fix."""


class ConfigError(UserError):
    """A recipe or override that does not validate."""


class DataError(UserError):
    """Input data that breaks the data contract (bad values, missing columns, empty splits)."""


class ModelError(UserError):
    """A network that cannot be built, loaded or run as configured (train.model): an import path that
    does not resolve, arguments that do not fit, a forward of the wrong shape, a BatchNorm layer bnflow
    cannot synchronize or recalibrate exactly, warm-start weights that do not fit."""


class TrainingDiverged(UserError):
    """The loss became NaN or inf: the optimizer settings (learning rate, clipping) need changing."""


class SchemaMismatch(DataError):
    """An Arrow schema at a stage boundary that differs from the contract."""


class ServiceUnavailable(Exception):
    """A service the run needs (the tracking server, the model registry) did not answer mid-run.
    Nothing is wrong with the input: rerunning the same run id later continues where it stopped."""


def find_user_error(exc: BaseException) -> UserError | None:
    """The UserError inside ``exc``, which Ray wraps (RayTaskError.cause, Ray Train's per-rank
    worker failures), or None. Ray's own ``RayTaskError(DataError)`` hybrids are skipped in favour
    of the original inside them: their message carries the remote traceback."""
    seen, stack, hybrid = set(), [exc], None
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            if not type(e).__module__.startswith("ray."):
                return e
            hybrid = hybrid or e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            stack += list(failures.values())
    return hybrid
