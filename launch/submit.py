"""``rpg-dist submit``: run a config on a Ray cluster as a Ray job.

The config is validated here first (with its overrides) and shipped to the cluster in the job's
``runtime_env`` working directory, without credentials (``config.public_config``), so the job runs
exactly what was checked locally with the cluster's own storage credentials. The cluster's
nodes must have rpg-dist installed (see cluster/README.md); artefacts go to the config's ``run_dir``,
which on a real cluster should be shared storage (s3://, gs://) rather than a local path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
import time

from rpg_dist.config import has_secrets, load_config, public_config
from rpg_dist.configlib import to_yaml

log = logging.getLogger(__name__)

SHIPPED_CONFIG = "rpg_dist_job.yaml"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Environment passed through to the job when set here. Never credentials: runtime_env is visible in
# the dashboard; clusters get storage credentials from instance roles / service accounts.
PASSTHROUGH_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "HF_HUB_OFFLINE", "DS_ACCELERATOR")


def submit(address: str, config: str, overrides: list[str], command: str = "run", wait: bool = False) -> int:
    """Submit ``rpg-dist COMMAND --config`` as a Ray job; with ``wait``, stream its logs.

    Returns:
        0 once submitted (or, with ``wait``, when the job SUCCEEDED), 1 if it FAILED or was STOPPED.
    """
    from ray.job_submission import JobSubmissionClient

    cfg = load_config(config, overrides)
    if "://" not in cfg.run_dir and not os.path.isabs(cfg.run_dir):
        log.warning("run_dir %r is relative: on a cluster it lands in the job's scratch directory", cfg.run_dir)
    if has_secrets(cfg):
        log.warning("storage credentials in the config are not shipped (the job's working_dir is visible "
                    "on the dashboard): the job uses the cluster's own (instance role, service account)")
    client = JobSubmissionClient(address)
    with tempfile.TemporaryDirectory(prefix="rpg-dist-job-") as workdir:
        with open(os.path.join(workdir, SHIPPED_CONFIG), "w") as handle:
            handle.write(to_yaml(public_config(cfg)))
        job_id = client.submit_job(
            entrypoint=f"rpg-dist {command} --config {SHIPPED_CONFIG}",
            runtime_env={"working_dir": workdir, "env_vars": _env_vars()},
            metadata={"rpg_dist_command": command, "run_dir": cfg.run_dir},
        )
    print(f"submitted job {job_id} to {address}: rpg-dist {command} (run_dir {cfg.run_dir})", flush=True)
    if not wait:
        return 0
    status = wait_for(client, job_id)
    print(f"job {job_id}: {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def wait_for(client, job_id: str, poll_s: float = 1.0) -> str:
    """Stream the job's logs to stdout until it ends; returns its final status name."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except Exception as err:  # log streaming is best effort; the status below is authoritative
        log.warning("log streaming stopped: %s", err)
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
        time.sleep(poll_s)
    return status


def _env_vars() -> dict[str, str]:
    return {name: os.environ[name] for name in PASSTHROUGH_ENV if name in os.environ}
