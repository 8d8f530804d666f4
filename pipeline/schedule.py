"""`kprune schedule`: the batch flow as a Prefect deployment on a cron schedule, served by this process.

A schedule needs a Prefect server that outlives the command (`prefect server start`; the temporary server
of a single run refuses schedules), named by PREFECT_API_URL. The deployments of this project are those
of the flow "batch" tagged "kprune"; `--list` shows them, `--remove NAME` deletes one.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

TAG = "kprune"
FLOW = "batch"  # pipeline.batch.batch_flow's name
START_SERVER = (
    "start one with 'prefect server start' (it listens on 127.0.0.1:4200) and set "
    "PREFECT_API_URL=http://127.0.0.1:4200/api"
)


def check_server() -> str:
    """PREFECT_API_URL, if a server answers there; else a ValueError saying how to start one."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        raise ValueError(
            f"a schedule needs a running Prefect server and PREFECT_API_URL is not set: {START_SERVER}"
        )
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=5) as response:
            if response.status == 200:
                return url
    except OSError:
        pass
    raise ValueError(f"no Prefect server answers at PREFECT_API_URL={url}: {START_SERVER}")


def serve(jobs_file: str, cron: str, timezone: str, name: str | None, options: dict) -> None:
    """Serve the deployment (until Ctrl-C): a batch run of ``jobs_file`` at every ``cron`` time."""
    check_server()
    from prefect import serve as serve_deployments
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from pipeline.batch import batch_flow

    try:
        schedule = Cron(cron, timezone=timezone)
    except ValueError as error:
        raise ValueError(f"--cron {cron!r} --timezone {timezone!r}: {' '.join(str(error).split())}") from None
    absolute = {
        key: str(Path(value).resolve())
        for key, value in options.items()
        if key in ("store_dir", "out", "params_file") and value
    }
    parameters = {**options, **absolute, "jobs_file": str(Path(jobs_file).resolve()), "quiet": True}
    deployment = batch_flow.to_deployment(
        name=name or Path(jobs_file).stem,
        schedules=[schedule],
        parameters=parameters,
        tags=[TAG],
        entrypoint_type=EntrypointType.MODULE_PATH,  # runs import pipeline.batch, as `kprune batch` does
        description=f"kprune batch {jobs_file} ({cron}, {timezone})",
    )
    print(f"serving deployment {FLOW}/{deployment.name}: {cron} ({timezone}); Ctrl-C stops it", flush=True)
    serve_deployments(deployment, print_starting_message=False)


def _deployments(client) -> list:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterTags,
        FlowFilter,
        FlowFilterName,
    )

    return client.read_deployments(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW])),
        deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[TAG])),
    )


def list_deployments() -> str:
    check_server()
    from prefect import get_client

    with get_client(sync_client=True) as client:
        deployments = _deployments(client)
    if not deployments:
        return "no kprune deployments (kprune schedule JOBS_YAML --cron ... makes one)"
    lines = []
    for deployment in deployments:
        crons = [
            f"{item.schedule.cron} ({item.schedule.timezone})"
            for item in deployment.schedules
            if hasattr(item.schedule, "cron")
        ]
        jobs = deployment.parameters.get("jobs_file", "?")
        state = "paused" if deployment.paused else "active"
        lines.append(f"{FLOW}/{deployment.name}  {', '.join(crons) or 'no schedule'}  {state}  {jobs}")
    return "\n".join(lines)


def remove_deployment(name: str) -> None:
    check_server()
    from prefect import get_client

    with get_client(sync_client=True) as client:
        found = [deployment for deployment in _deployments(client) if deployment.name == name]
        if not found:
            raise ValueError(f"no kprune deployment named {name!r}; see 'kprune schedule --list'")
        client.delete_deployment(found[0].id)
