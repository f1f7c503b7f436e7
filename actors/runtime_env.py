"""The runtime environment every Ray process of a kilnlm application gets (``kiln up``, ``kiln serve``).

One place, so that the driver of ``kiln up``, the Ray job ``kiln up --cluster`` submits and
``kiln serve`` give their processes the same environment.
"""

from __future__ import annotations

import os
from typing import Any

from kilnlm.checkpoint import remote

ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
"""Every Ray process: one OpenMP thread (2 cores shared by ~8 processes), no tokenizers pool."""
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray in a job's driver: its presence means this process runs inside a Ray job."""


def runtime_env() -> dict[str, Any] | None:
    """The ``runtime_env`` for ``ray.init``: ENV for every process; None inside a Ray job, whose
    own runtime env already applies (``submit_up`` puts ENV there) and which Ray refuses to see
    repeated by the driver."""
    if JOB_CONFIG_ENV in os.environ:
        return None
    # This shell's object-storage settings too (AWS_ENDPOINT_URL, region; keys only when Ray is
    # local): the gate and the replicas fetch checkpoints from the bucket the trainer wrote.
    local = not os.environ.get("RAY_ADDRESS")
    return {"env_vars": {**ENV, **remote.storage_env(secrets=local)}}


__all__ = ["ENV", "JOB_CONFIG_ENV", "runtime_env"]
