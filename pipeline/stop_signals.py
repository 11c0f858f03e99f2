"""SIGTERM and Ctrl-C stop a run: the handler raises ``Interrupted`` and remembers the signal.

``Interrupted`` is a ``BaseException`` (like ``KeyboardInterrupt``), so code that
reads "any exception" as "this chunk is unreadable" cannot swallow it; should it
be swallowed anyway, the executors call ``raise_if_stopped`` between units.
"""

from __future__ import annotations

import signal
import threading

from pipeline.errors import Interrupted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[int] = []


def _stop(signum, frame):
    _received.append(signum)
    raise Interrupted(signum)


def install_stop_handlers() -> dict:
    """Install the handlers in the main thread; returns the handlers they replace.

    Called again after Ray starts, because ``ray.init`` installs its own SIGTERM handler.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, _stop) for signum in STOP_SIGNALS}


def restore_handlers(saved: dict) -> None:
    """Put back the handlers ``install_stop_handlers`` replaced and forget received signals."""
    for signum, handler in saved.items():
        signal.signal(signum, handler)
    _received.clear()


def raise_if_stopped() -> None:
    """Raise ``Interrupted`` if a stop signal arrived since the handlers were installed."""
    if _received:
        raise Interrupted(_received[-1])
