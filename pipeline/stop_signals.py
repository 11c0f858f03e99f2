"""SIGTERM and Ctrl-C stop a run: the handler records the signal and raises ``Interrupted``.

``Interrupted`` is a ``BaseException`` (like ``KeyboardInterrupt``), so code that
reads "any exception" as "this chunk is unreadable" cannot swallow it; should it
be swallowed anyway, the executors call ``raise_if_stopped`` between units.

Two places must not see the exception raised in their middle:

- calls into Ray's C code (``ray.init``, ``ray.wait``, ``ray.get``): an exception
  raised there by a Python signal handler comes out as ``SystemError: <cyfunction
  ...> returned a result with an exception set``. Such calls run inside
  ``deferred()``: the signal is only recorded, and ``Interrupted`` is raised as
  soon as the call returns (callers keep the calls short, e.g. ``ray.wait`` with
  a timeout of a second);
- the clean-up that an ``Interrupted`` sets off (closing actors, releasing the
  store's lock): only the first signal raises, later ones are recorded.

Where the handler runs inside a finalizer or a callback from C code that cannot
propagate exceptions (TensorFlow's, during tracing), Python would print the
swallowed ``Interrupted`` with a traceback: the unraisable hook keeps quiet about
it, the signal stays recorded, and the next ``raise_if_stopped`` raises it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

from pipeline.errors import Interrupted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[int] = []
_deferring = 0  # depth of nested ``deferred()`` blocks; handlers run in the main thread only


def _stop(signum, frame):
    first = not _received
    _received.append(signum)
    if first and not _deferring:
        raise Interrupted(signum)


def _quiet_when_stopping(unraisable) -> None:
    if isinstance(unraisable.exc_value, Interrupted):
        return  # recorded in _received: raise_if_stopped raises it where it can propagate
    sys.__unraisablehook__(unraisable)


def install_stop_handlers() -> dict:
    """Install the handlers in the main thread; returns the handlers they replace.

    Called again after Ray starts, because ``ray.init`` installs its own SIGTERM handler
    (the Ray executor also keeps ``ray.init`` from doing so, see ``executors.start_ray``).
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    saved = {signum: signal.signal(signum, _stop) for signum in STOP_SIGNALS}
    if sys.unraisablehook is not _quiet_when_stopping:
        saved["unraisablehook"] = sys.unraisablehook
        sys.unraisablehook = _quiet_when_stopping
    return saved


def restore_handlers(saved: dict) -> None:
    """Put back the handlers ``install_stop_handlers`` replaced and forget received signals."""
    for key, handler in saved.items():
        if key == "unraisablehook":
            sys.unraisablehook = handler
        else:
            signal.signal(key, handler)
    _received.clear()


def raise_if_stopped() -> None:
    """Raise ``Interrupted`` (for the first signal) if a stop signal arrived since the handlers were installed."""
    if _received:
        raise Interrupted(_received[0])


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside, a stop signal is recorded but not raised; leaving the block raises ``Interrupted`` for it.

    For calls into C code that cannot take an exception from a signal handler (Ray's). A stop
    signal outranks an error the block raised: ``Interrupted`` replaces it.
    """
    global _deferring
    _deferring += 1
    try:
        yield
    except Interrupted:
        raise
    except BaseException:
        raise_if_stopped()
        raise
    else:
        raise_if_stopped()
    finally:
        _deferring -= 1
