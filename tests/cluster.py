"""A real multi-node Ray cluster on 127.0.0.1, started with `ray start`, torn down by process group."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env(token_path: str | None = None) -> dict:
    """This environment with the venv on PATH; ``token_path`` makes the Ray auth token available by Ray's own means."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_AUTH_")}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    if token_path:
        env["RAY_AUTH_TOKEN_PATH"] = token_path
    return env


def _processes() -> list[tuple[int, int, int]]:
    """(pid, ppid, pgid) of every process."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            found.append((int(entry), int(fields[1]), int(fields[2])))
    return found


def _group_members(group: int) -> list[int]:
    return [pid for pid, _, pgid in _processes() if pgid == group]


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in _processes():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def kill_group(group: int) -> None:
    """SIGKILL a process group that may already be gone."""
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


def start_driver(config_path: str) -> subprocess.Popen:
    """`hessdiag run CONFIG` as its own process group, so it and its local Ray can be killed together."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", config_path], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def recorded_units(path) -> int:
    """Units recorded done in the store at ``path`` (0 before it exists)."""
    from pipeline.store import ResultStore

    return len(ResultStore.open(str(path), mode="r").unit_records()) if ResultStore.exists(str(path)) else 0


def kill_driver_when(process: subprocess.Popen, ready, timeout: float = 240, poll: float = 0.05) -> None:
    """SIGKILL a driver once ``ready()`` is true (then its process group); fail if it ends first."""
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and process.poll() is None and not ready():
            time.sleep(poll)
        assert process.poll() is None, "the run ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        kill_group(process.pid)


@dataclass
class LocalCluster:
    """A head and worker nodes, each in its own process group so each can be killed alone.

    Started as a user would, with Ray's defaults: a token is available (RAY_AUTH_TOKEN_PATH), so Ray turns
    token authentication on; nothing sets RAY_AUTH_MODE.
    """

    port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="hdray-"))
    groups: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.token_path = os.path.join(self.temp_dir, "auth_token")
        Path(self.token_path).write_text(secrets.token_hex(32))

    @property
    def env(self) -> dict:
        return cluster_env(self.token_path)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, *args: str, env: dict | None = None) -> int:
        process = subprocess.Popen(
            [str(BIN / "ray"), "start", "--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
             f"--dashboard-agent-listen-port={free_port()}", *args],
            env=env or self.env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        output, _ = process.communicate(timeout=120)
        if process.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{output}")
        self.groups.append(process.pid)
        return process.pid

    def start_head(self) -> None:
        self._start("--head", f"--port={self.port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}")

    def add_node(self) -> int:
        """A worker node joins as Ray documents for authenticated clusters: RAY_AUTH_MODE=token on the node."""
        return self._start(f"--address={self.address}", env={**self.env, "RAY_AUTH_MODE": "token"})

    def alive_nodes(self) -> int:
        code = "import ray; ray.init(address='%s'); print(sum(n['Alive'] for n in ray.nodes()))" % self.address
        out = subprocess.run([sys.executable, "-c", code], env={**self.env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120)
        return int(out.stdout.strip().splitlines()[-1])

    def kill_node(self, group: int) -> None:
        """SIGKILL a node: its process group (raylet and agents) and every descendant (its workers)."""
        victims = set(_group_members(group))
        victims |= {child for pid in list(victims) for child in _descendants(pid)}
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        for group in self.groups:
            self.kill_node(group)
        time.sleep(1)
