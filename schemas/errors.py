"""User-facing errors: the CLI prints their message as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (config, data, files). The message names the field or file, the bad
    value and the fix."""


class ConfigError(UserError):
    """A recipe or override that does not validate."""


class DataError(UserError):
    """Input data that breaks the data contract (bad values, missing columns, empty splits)."""


class SchemaMismatch(DataError):
    """An Arrow schema at a stage boundary that differs from the contract."""
