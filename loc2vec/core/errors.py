"""One base class for errors caused by user input or environment, reported without a traceback."""


class Loc2VecError(Exception):
    """A problem the user can fix (bad input, missing import, unreachable database)."""


class ConfigError(Loc2VecError, ValueError):
    """A configuration value is missing or invalid (the message names the key)."""
