"""``hessdiag submit``: run a config as a Ray job that ships this package and the config.

Equivalent command line (from a directory holding the config):

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env-json '{"py_modules": ["/path/to/pipeline"]}' -- python -m pipeline run config.yaml
"""

from __future__ import annotations

import contextlib
import logging
import re
import shlex
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

from pipeline.config import load_config
from pipeline.errors import BadInputError, Interrupted
from pipeline.logs import verbose
from pipeline.ray_auth import auth_headers, missing_token_error
from pipeline.worker import worker_environment

CONFIG_NAME = "hessdiag_config.yaml"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def project_requirements() -> list[str]:
    """The installed project's runtime dependencies, for ``runtime_env['pip']``."""
    try:
        requires = metadata.requires("hessdiag") or []
    except metadata.PackageNotFoundError:
        return []
    return [r for r in requires if "extra ==" not in r]


def job_spec(config_path: str, overrides: list[str], pip: bool) -> tuple[str, dict, str]:
    """(entrypoint, runtime_env, staging dir) for a config; the config is checked locally first.

    Inside a job, ``cluster.address: null`` would start a second Ray on the head: the job joins its cluster.
    """
    config = load_config(config_path, overrides)  # malformed configs fail here, before anything is submitted
    if config.cluster.address is None:
        overrides = [*overrides, "cluster.address=auto"]
    staging = tempfile.mkdtemp(prefix="hessdiag-job-")
    shutil.copy(config_path, Path(staging) / CONFIG_NAME)
    runtime_env = {
        "working_dir": staging,
        "py_modules": [str(Path(__file__).resolve().parent)],
        "env_vars": worker_environment(),
    }
    if pip:
        runtime_env["pip"] = project_requirements()
    sets = " ".join(shlex.quote(f"--set={item}") for item in overrides)
    return f"python -m pipeline run {CONFIG_NAME} {sets}".strip(), runtime_env, staging


def exit_code_of(info) -> int:
    """The job's exit code: 0 on success, the entrypoint's code when Ray reports it, else 1."""
    status = str(getattr(info.status, "value", info.status))
    if status == "SUCCEEDED":
        return 0
    found = re.search(r"exit code (\d+)", info.message or "")
    return int(found.group(1)) if found else 1


def follow_job(client, job_id: str, print_: Callable[[str], None], poll: float = 1.0) -> int:
    """Stream the job's logs until it ends; return its exit code."""
    shown = 0
    while True:
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            print_(logs[shown:].rstrip("\n"))
            shown = len(logs)
        info = client.get_job_info(job_id)
        if str(getattr(info.status, "value", info.status)) in TERMINAL:
            logs = client.get_job_logs(job_id)
            if len(logs) > shown:
                print_(logs[shown:].rstrip("\n"))
            print_(f"job {job_id}: {info.status.value if hasattr(info.status, 'value') else info.status} {info.message or ''}".strip())
            return exit_code_of(info)
        time.sleep(poll)


def submit_job(config_path: str, address: str, overrides: list[str], follow: bool, print_=print, pip: bool = False) -> int:
    """Submit the run; print the job id; with ``follow`` stream logs and return the job's exit code."""
    entrypoint, runtime_env, staging = job_spec(config_path, overrides, pip)
    try:
        with jobs_api_errors(address):
            client = jobs_client(address)
            job_id = submit_when_an_agent_is_ready(client, entrypoint=entrypoint, runtime_env=runtime_env,
                                                   metadata={"tool": "hessdiag"})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print_(f"submitted job {job_id} to {address}: {entrypoint}")
    print_(f"follow it with: hessdiag status {job_id} --address {address}")
    if not follow:
        return 0
    try:
        with jobs_api_errors(address):
            return follow_job(client, job_id, print_)
    except Interrupted as exc:  # the job is not stopped with the command that follows it
        raise Interrupted(exc.signum, f"interrupted; job {job_id} keeps running: hessdiag status {job_id} --address {address}") from None


AGENT_WAIT_SECONDS = 60.0


def submit_when_an_agent_is_ready(client, **job) -> str:
    """``client.submit_job(**job)``, retried for up to AGENT_WAIT_SECONDS while the cluster answers that no job agent
    is available yet ("please try again later": a cluster that has just started)."""
    deadline = time.monotonic() + AGENT_WAIT_SECONDS
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(1.0)


def jobs_client(address: str):
    """A Jobs API client that authenticates with the cluster's token when one is available.

    Unless verbose, Ray's INFO lines ("Uploading package ...") stay off stderr.
    """
    from ray.job_submission import JobSubmissionClient

    if not verbose():
        for name in ("ray", "ray.dashboard.modules.dashboard_sdk"):  # the second sets its own level at import
            logging.getLogger(name).setLevel(logging.WARNING)
    return JobSubmissionClient(address, headers=auth_headers())


@contextlib.contextmanager
def jobs_api_errors(address: str) -> Iterator[None]:
    """Turn the Jobs API's failures into one clear line (exit 2) instead of a traceback."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError:
        raise missing_token_error(address) from None
    except ConnectionError as exc:
        raise BadInputError(f"cannot reach the Ray dashboard at {address}: {str(exc).splitlines()[0][:200]}") from None
    except RuntimeError as exc:
        raise BadInputError(f"the Ray Jobs API at {address} refused the request: {str(exc).splitlines()[0][:300]}") from None


def job_status(job_id: str, address: str) -> dict:
    """Status, message and the last log lines of a submitted job."""
    with jobs_api_errors(address):
        return _job_status(jobs_client(address), job_id)


def _job_status(client, job_id: str) -> dict:
    info = client.get_job_info(job_id)
    status = str(getattr(info.status, "value", info.status))
    return {
        "job_id": job_id,
        "status": status,
        "message": info.message,
        "exit_code": exit_code_of(info) if status in TERMINAL else None,
        "log_tail": client.get_job_logs(job_id).splitlines()[-15:],
    }
