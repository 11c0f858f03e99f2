"""Exception types whose class decides the command-line exit code (validation failures exit 3 in the CLI)."""


class HessdiagError(Exception):
    """Base class; exit code 1."""

    exit_code = 1


class BadInputError(HessdiagError, ValueError):
    """The config, model, data or store does not fit the request; exit code 2."""

    exit_code = 2


class NonFiniteLossError(BadInputError):
    """The loss (or its derivatives) is NaN or infinite at the given weights."""


class Interrupted(BaseException):
    """SIGTERM or Ctrl-C stopped the run; exit code 128 + the signal number (143, 130).

    A ``BaseException``, like ``KeyboardInterrupt``, so that ``except Exception`` cannot swallow it.
    """

    def __init__(self, signum: int, message: str | None = None):
        super().__init__(message or "interrupted; rerun the same command to resume")
        self.signum = signum
        self.exit_code = 128 + signum
