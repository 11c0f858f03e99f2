"""What a command prints besides its own lines: TensorFlow's and Ray's logs stay off unless asked for.

hessdiag prints its progress lines (``[hessdiag HH:MM:SS] ...``), its tables and one-line errors.
``--verbose`` or ``HESSDIAG_DEBUG=1`` adds TensorFlow's and Ray's own lines (and the traceback of
an unexpected error). What each quiet setting silences, measured with TensorFlow 2.21 and Ray 2.60:

- TensorFlow's C++ log lines (cpu_feature_guard, "failed call to cuInit" where no GPU driver is
  installed, "Not handling type DT_DOUBLE" during validation): ``TF_CPP_MIN_LOG_LEVEL=3``, which
  TensorFlow reads once, when it is imported; a value the user set is kept.
- The lines its libraries write while they load, whatever ``TF_CPP_MIN_LOG_LEVEL`` says ("WARNING:
  All log messages before absl::InitializeLog() is called are written to STDERR", then the oneDNN
  and CUDA-stub notices, once per library carrying its own copy of absl): ``import_tensorflow``
  loads TensorFlow with the process's stderr file descriptor pointed at /dev/null.
- TensorFlow's Python warnings (``tf.function`` retracing notices during validation): its logger
  is set to ERROR.
- Ray: see ``executors.start_ray`` (actors' output stays in Ray's log files) and
  ``ray_auth.choose_local_token_mode`` (the token-authentication notice).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

DEBUG = "HESSDIAG_DEBUG"
TF_LOG_LEVEL = "TF_CPP_MIN_LOG_LEVEL"


def verbose() -> bool:
    """Whether TensorFlow's and Ray's own lines are wanted (``HESSDIAG_DEBUG`` set and not 0)."""
    return os.environ.get(DEBUG, "").strip() not in ("", "0")


def quiet_start(verbose_flag: bool = False) -> None:
    """First thing a command does, before TensorFlow or Ray is imported.

    ``verbose_flag`` (``--verbose``) sets ``HESSDIAG_DEBUG=1``, so that Ray actors and submitted jobs
    see it too. Quiet, TensorFlow logs only fatal errors unless the user set ``TF_CPP_MIN_LOG_LEVEL``.
    """
    if verbose_flag:
        os.environ[DEBUG] = "1"
    if not verbose():
        os.environ.setdefault(TF_LOG_LEVEL, "3")


@contextlib.contextmanager
def _stderr_descriptor_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null: what C++ code writes there is dropped (Python's too)."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def import_tensorflow() -> None:
    """Import TensorFlow, dropping the lines its libraries print while loading unless verbose.

    A failed import still raises; only its load-time prints are lost (``--verbose`` shows them).
    """
    if "tensorflow" in sys.modules or verbose():
        import tensorflow  # noqa: F401
        return
    with _stderr_descriptor_silenced():
        import tensorflow
    tensorflow.get_logger().setLevel("ERROR")  # its Python warnings (tf.function retracing notices, say)
