r"""Scheduled curation: serve the `curate` flow as a Prefect deployment with a cron schedule.

    python -m flows.serve                 # daily at 03:00 UTC: ./params.yaml on the bundled sample into ./outputs
    python -m flows.serve --cron "0 */6 * * *" --timezone Europe/Paris \
        --params my_params.yaml --input /data/pool.jsonl --outputs /data/curated
    GRACE_CRON="30 2 * * 1" GRACE_INPUT=/data/pool.jsonl python -m flows.serve   # the same knobs from the environment

This module is the one place the deployment is declared: its name, its schedule and the flow
parameters every run gets. `flow.serve` needs no work pool and no worker: this process registers
the deployment with the Prefect API that PREFECT_API_URL names (a local `prefect server start`, a
self-hosted server or Prefect Cloud), then polls it and runs each scheduled or manually triggered
run in a subprocess on this machine. Ctrl-C stops serving and pauses the schedule until it serves again.
With no PREFECT_API_URL it refuses to start: Prefect's temporary API lives only as long as this process
and fires no schedule.
"""

from __future__ import annotations

import argparse
import inspect
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping

from prefect.client.schemas.schedules import is_valid_timezone
from prefect.schedules import Cron, Schedule
from prefect.settings import PREFECT_API_URL

from flows.curate import curate, prefect_settings

# The flow's own defaults stay the single source of the default paths.
FLOW_DEFAULTS = {name: p.default for name, p in inspect.signature(curate.fn).parameters.items()}


@dataclass(frozen=True)
class DeploymentSpec:
    """The deployment: its name, when it runs, and the curate parameters every run gets."""

    name: str = "grace-curate-daily"
    cron: str = "0 3 * * *"  # minute hour day-of-month month day-of-week: daily at 03:00
    timezone: str = "UTC"  # IANA zone the cron is read in; a DST zone keeps 03:00 local all year
    params_path: str = FLOW_DEFAULTS["params_path"]
    input_path: str = FLOW_DEFAULTS["input_path"]
    outputs_dir: str = FLOW_DEFAULTS["outputs_dir"]

    def parameters(self) -> dict[str, str]:
        """Absolute paths, so a run reads and writes the same files whatever directory runs it."""
        return {
            "params_path": str(Path(self.params_path).resolve()),
            "input_path": str(Path(self.input_path).resolve()),
            "outputs_dir": str(Path(self.outputs_dir).resolve()),
        }

    def schedule(self) -> Schedule:
        return Cron(self.cron, timezone=self.timezone)


# Spec field -> (command line flag, environment variable, help); the flag wins over the variable.
SETTINGS = {
    "name": ("--name", "GRACE_DEPLOYMENT_NAME", "deployment name"),
    "cron": ("--cron", "GRACE_CRON", "cron schedule, e.g. '0 3 * * *' (daily 03:00)"),
    "timezone": ("--timezone", "GRACE_TIMEZONE", "IANA time zone of the cron, e.g. Europe/Paris"),
    "params_path": ("--params", "GRACE_PARAMS", "params file every run reads"),
    "input_path": ("--input", "GRACE_INPUT", "traces to curate (file or HF dataset directory)"),
    "outputs_dir": ("--outputs", "GRACE_OUTPUTS", "directory the stage outputs are written to"),
}


def spec_from_args(argv: list[str] | None = None, environ: Mapping[str, str] = os.environ) -> DeploymentSpec:
    """Read the spec from flags, then environment variables, then the defaults; refuse bad settings at start."""
    defaults = {f.name: f.default for f in fields(DeploymentSpec)}
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    for field_name, (flag, env_var, help_text) in SETTINGS.items():
        default = environ.get(env_var, defaults[field_name])
        parser.add_argument(flag, dest=field_name, metavar=field_name.split("_")[0].upper(), default=default,
                            help=f"{help_text} [env {env_var}; default {default!r}]")
    spec = DeploymentSpec(**vars(parser.parse_args(argv)))

    def refuse(field_name: str, problem: str) -> None:
        flag, env_var, _ = SETTINGS[field_name]
        parser.error(f"{flag} / {env_var}: {problem}")

    try:
        spec.schedule()
    except ValueError as error:
        refuse("cron", str(error))
    if not is_valid_timezone(spec.timezone):  # the API's own rule, checked before it rejects the deployment
        refuse("timezone", f"unknown time zone {spec.timezone!r} (IANA names, e.g. UTC or America/New_York)")
    # Every scheduled run would fail on a mistyped path: say so now, not at 03:00.
    for field_name in ("params_path", "input_path"):
        if not Path(getattr(spec, field_name)).exists():
            refuse(field_name, f"{getattr(spec, field_name)} does not exist")
    return spec


NO_API = ("python -m flows.serve: error: PREFECT_API_URL is not set, and a schedule fires only on a running "
          "Prefect API: start one with `prefect server start` and `prefect config set "
          "PREFECT_API_URL=http://127.0.0.1:4200/api` (or `prefect cloud login`), then serve again")


def main(argv: list[str] | None = None) -> None:
    spec = spec_from_args(argv)
    if not PREFECT_API_URL.value():  # the environment or the active Prefect profile
        raise SystemExit(NO_API)
    with prefect_settings():  # the temporary API's start limit, should serving need one
        curate.serve(
            name=spec.name,
            schedules=[spec.schedule()],
            parameters=spec.parameters(),
            tags=["grace-curate"],
            description=f"GRACE curation of {spec.input_path} with {spec.params_path} at {spec.cron!r} ({spec.timezone})",
            limit=1,  # one run at a time: two runs writing the same outputs directory would mix their files
        )


if __name__ == "__main__":
    main()
