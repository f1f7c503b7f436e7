"""``kiln up --cluster``: the same loop submitted as a Ray job, followed from here; and the admin
token a run uses."""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kilnlm.actors.runtime_env import ENV

REMOTE_CONFIG_FLAGS = ("--config", "--serve-config")
"""Flags whose files travel with the job (its working_dir) instead of being read on the head."""


def submit_up(
    address: str,
    argv: list[str],
    files: dict[str, str],
    token: str,
    follow: bool = True,
    say: Callable[[str], None] = print,
) -> int:
    """Submit ``kiln up --ray-address auto ARGV`` as a Ray job at ``address`` (the dashboard,
    e.g. http://127.0.0.1:8265) and follow its output; the job's exit code when followed.

    ``files`` (flag → local path) are copied into the job's working directory and passed by
    name, so the job reads the configs as they are here, not stale copies on the head. The admin
    token travels in the job's environment, never on its command line.
    """
    from ray.exceptions import RayError
    from ray.job_submission import JobSubmissionClient

    with tempfile.TemporaryDirectory(prefix="kiln-up-job-") as work:
        entry = ["kiln", "up", "--ray-address", "auto", *argv]
        for flag, path in files.items():
            name = f"{flag.lstrip('-').replace('-', '_')}{Path(path).suffix}"
            shutil.copyfile(path, Path(work) / name)
            entry += [flag, name]
        env = {**ENV, "KILN_ADMIN_TOKEN": token}
        try:  # unreachable, refused, wrong token: the caller reports one ConnectionError
            client = JobSubmissionClient(address)
            job_id = client.submit_job(
                entrypoint=shlex.join(entry), runtime_env={"working_dir": work, "env_vars": env}
            )
        except RayError as e:
            raise ConnectionError(str(e)) from e
    say(f"kiln up: submitted {job_id} to {address}: {shlex.join(entry)}")
    if not follow:
        say(f"follow it with: ray job logs --address {address} --follow {job_id}")
        return 0
    try:
        return follow_job(client, job_id, address, say)
    except RayError as e:
        raise ConnectionError(str(e)) from e


def follow_job(client: Any, job_id: str, address: str, say: Callable[[str], None]) -> int:
    """Print the job's output as it comes; 0 if it succeeded. Ctrl-C stops following only."""
    import asyncio

    from ray.job_submission import JobStatus

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        say(
            f"kiln up: stopped following; the job runs on (ray job stop --address {address} {job_id})"
        )
        return 130
    status = client.get_job_status(job_id)
    say(f"kiln up: job {job_id} {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1


def admin_token(local: bool, say: Callable[[str], None]) -> str | None:
    """$KILN_ADMIN_TOKEN; for a local run without one, a fresh random token (printed, since
    the gateway only listens on loopback there and `kiln status` needs it)."""
    token = os.environ.get("KILN_ADMIN_TOKEN")
    if token:
        return token
    if not local:
        say("[kiln up] no $KILN_ADMIN_TOKEN: the gateway refuses admin calls (status, promote)")
        return None
    token = secrets.token_hex(16)
    say(f"[kiln up] admin token for this run: export KILN_ADMIN_TOKEN={token}")
    return token
