"""Exception types whose class decides the command-line exit code."""


class HessdiagError(Exception):
    """Base class; exit code 1."""

    exit_code = 1


class BadInputError(HessdiagError, ValueError):
    """The config, model, data or store does not fit the request; exit code 2."""

    exit_code = 2


class ValidationFailedError(HessdiagError):
    """Finite-difference validation rejected the computed result; exit code 3."""

    exit_code = 3


class NonFiniteLossError(BadInputError):
    """The loss (or its derivatives) is NaN or infinite at the given weights."""
