"""Exception types whose class decides the command-line exit code (validation failures exit 3 in the CLI)."""


class HessdiagError(Exception):
    """Base class; exit code 1."""

    exit_code = 1


class BadInputError(HessdiagError, ValueError):
    """The config, model, data or store does not fit the request; exit code 2."""

    exit_code = 2


class NonFiniteLossError(BadInputError):
    """The loss (or its derivatives) is NaN or infinite at the given weights."""
