"""Ray token authentication, found by Ray's own means so that users never set RAY_AUTH_MODE by hand.

Ray (2.59+) enables token authentication on a head started while a token is
available, but its clients send the token only when RAY_AUTH_MODE=token is set
in their environment. hessdiag looks for the token where Ray does and, when it
finds one, turns token mode on for its own process (and so for its Ray workers
and job drivers) and sends it to the Jobs API.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline.errors import BadInputError

TOKEN_MEANS = "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or the file ~/.ray/auth_token (`ray get-auth-token` on the head prints it)"


def find_token() -> str | None:
    """The Ray auth token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, in Ray's order."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise BadInputError(f"RAY_AUTH_TOKEN_PATH={path!r} cannot be read: {exc.strerror}") from None
        if not token:
            raise BadInputError(f"RAY_AUTH_TOKEN_PATH={path!r} is empty")
        return token
    default = Path.home() / ".ray" / "auth_token"
    return default.read_text().strip() or None if default.is_file() else None


def use_available_token() -> str | None:
    """Turn Ray's token mode on for this process when a token is available and the user chose no mode.

    Only before Ray is imported: Ray fixes its mode at import, and a mode set later would reach the
    processes it starts but not its own client.
    """
    token = find_token()
    if token and not os.environ.get("RAY_AUTH_MODE") and "ray" not in sys.modules:
        os.environ["RAY_AUTH_MODE"] = "token"
    return token


def choose_local_token_mode() -> None:
    """Choose token mode explicitly for the fresh local Ray this process is about to start.

    A new local Ray turns token authentication on when RAY_AUTH_MODE is unset (generating a token
    if none exists) and says so on stderr ("Token authentication is enabled for this Ray
    cluster..."); choosing that same mode beforehand keeps the line out of every run. A mode the
    user chose is kept; only before Ray is imported (see ``use_available_token``).
    """
    if not os.environ.get("RAY_AUTH_MODE") and "ray" not in sys.modules:
        os.environ["RAY_AUTH_MODE"] = "token"


def auth_headers() -> dict[str, str]:
    """HTTP headers for the Ray Jobs API: the bearer token when one is available."""
    token = use_available_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def missing_token_error(address: str) -> BadInputError:
    return BadInputError(f"the Ray cluster at {address} requires an authentication token and none was found; provide it with {TOKEN_MEANS}")
