"""hessdiag: exact gradients and Hessian diagonals of a Keras model's weight tensors, one or the whole network."""

__version__ = "0.1.0"


def load_result(path: str, storage_options: dict | None = None):
    """``"layer/weight"`` -> that tensor's arrays and attributes, of a finished store; see ``pipeline.results``."""
    from pipeline.results import load_result as _load

    return _load(path, storage_options)
