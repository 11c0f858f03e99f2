"""hessdiag: exact gradients and Hessian diagonals of one large parameter tensor."""

__version__ = "0.1.0"


def load_result(path: str, storage_options: dict | None = None):
    """Arrays and metadata of a finished store; see ``pipeline.results.load_result``."""
    from pipeline.results import load_result as _load

    return _load(path, storage_options)
