"""The scheduled deployment end to end: a real Prefect server on loopback, `python -m flows.serve`
registering the cron deployment, one run triggered through the API, its outputs and its artifact.

The server (tens of seconds to start) and the serve process each run in their own process group,
killed in the fixture finalizers whether the test passes or not.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.curate import SUMMARY_ARTIFACT_KEY, curate
import flows.serve
from flows.serve import DeploymentSpec, spec_from_args
from tests.params_yaml import committed_document

REPO = Path(__file__).resolve().parents[2]
SERVER_START_TIMEOUT_S = 180  # a cold server start (imports, database migrations) takes tens of seconds
SERVE_START_TIMEOUT_S = 120  # the serve process imports torch and transformers before it registers
RUN_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(command: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> subprocess.Popen:
    """Start `command` as the leader of a new process group, so stopping it also stops its children."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the process group; SIGKILL whatever of it is still alive 15 s later."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _tail(log_path: Path, n: int = 4000) -> str:
    return log_path.read_text(errors="replace")[-n:]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A Prefect server on 127.0.0.1 with its own home and SQLite database; yields the env to reach it."""
    home = tmp_path_factory.mktemp("prefect_server")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        # The cron must not start runs of its own next to the one the test triggers.
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    }
    log_path = home / "server.log"
    server = _start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                     "--port", str(port)], env, home, log_path)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None:
                pytest.fail(f"prefect server exited with {server.returncode}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server not healthy after {SERVER_START_TIMEOUT_S} s:\n{_tail(log_path)}")
            time.sleep(0.5)
        yield env
    finally:
        _stop(server)


@pytest.fixture
def workspace(tmp_path, gsm_rows, tiny_model_dir) -> Path:
    """A params file on the tiny local model and a three-trace GSM pool, as a user's directory would hold them."""
    params = committed_document()
    params["model"]["source"] = str(tiny_model_dir)
    params["extract"]["cache_dir"] = None  # no cache: the run must compute everything it reports
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(row) + "\n" for row in gsm_rows))
    return tmp_path


SERVE_ARGS = ["--name", "test-curate", "--cron", "15 4 * * 1-5", "--timezone", "Europe/Paris",
              "--params", "params.yaml", "--input", "pool.jsonl", "--outputs", "outputs"]


@pytest.fixture
def serving(prefect_server, workspace):
    """`python -m flows.serve` run from the workspace with relative paths, as a user would type it."""
    env = {**prefect_server, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    log_path = workspace / "serve.log"
    process = _start([sys.executable, "-m", "flows.serve", *SERVE_ARGS], env, workspace, log_path)
    try:
        yield process, log_path
    finally:
        _stop(process)


@pytest.mark.slow
def test_served_deployment_runs_on_demand_and_publishes_outputs(prefect_server, workspace, serving):
    process, log_path = serving
    full_name = f"{curate.name}/test-curate"

    with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + SERVE_START_TIMEOUT_S
            while True:
                try:
                    deployment = client.read_deployment_by_name(full_name)
                    break
                except ObjectNotFound:
                    pass
                assert process.poll() is None, f"serve exited with {process.returncode}:\n{_tail(log_path)}"
                assert time.monotonic() < deadline, f"{full_name} not registered:\n{_tail(log_path)}"
                time.sleep(1)

            # The deployment carries the cron, its zone, and the relative paths made absolute.
            [schedule] = deployment.schedules
            assert (schedule.schedule.cron, schedule.schedule.timezone) == ("15 4 * * 1-5", "Europe/Paris")
            assert schedule.active
            assert deployment.parameters == {
                "params_path": str((workspace / "params.yaml").resolve()),
                "input_path": str((workspace / "pool.jsonl").resolve()),
                "outputs_dir": str((workspace / "outputs").resolve()),
            }

            flow_run = run_deployment(full_name, timeout=RUN_TIMEOUT_S, poll_interval=1, as_subflow=False)
            assert flow_run.state is not None and flow_run.state.is_completed(), (
                f"run ended {flow_run.state}:\n{_tail(log_path)}")
            artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))

    outputs = workspace / "outputs"
    ingest = json.loads((outputs / "ingest" / "stats.json").read_text())
    assert (ingest["read"], ingest["kept"]) == (3, 3)
    manifest = json.loads((outputs / "select" / "manifest.json").read_text())
    assert set(manifest["subsets"]) == {"top5pct", "top10pct", "top20pct"} and manifest["n_scored"] == 3
    assert json.loads((outputs / "validate" / "results.json").read_text())["success"] is True
    assert (outputs / "report" / "report.html").is_file()
    [summary] = [artifact for artifact in artifacts if artifact.key == SUMMARY_ARTIFACT_KEY]
    assert summary.type == "markdown" and "| ingest | 3 | 3 | 0 |" in summary.data


def test_flags_override_environment_which_overrides_defaults(tmp_path):
    (tmp_path / "p.yaml").write_text("{}\n")
    environ = {"GRACE_CRON": "0 2 * * *", "GRACE_TIMEZONE": "Asia/Tokyo", "GRACE_PARAMS": str(tmp_path / "p.yaml"),
               "GRACE_INPUT": str(tmp_path)}
    spec = spec_from_args(["--cron", "0 1 * * 0"], environ=environ)
    assert (spec.cron, spec.timezone, spec.params_path) == ("0 1 * * 0", "Asia/Tokyo", str(tmp_path / "p.yaml"))
    assert (spec.name, spec.outputs_dir) == (DeploymentSpec.name, "outputs")
    assert (spec.schedule().cron, spec.schedule().timezone) == ("0 1 * * 0", "Asia/Tokyo")
    assert spec.parameters()["input_path"] == str(tmp_path.resolve())


@pytest.mark.parametrize("args, named", [
    (["--cron", "every night"], "--cron / GRACE_CRON"),
    (["--timezone", "Mars/Olympus"], "--timezone / GRACE_TIMEZONE"),
    (["--params", "missing.yaml"], "--params / GRACE_PARAMS"),
    (["--input", "missing.jsonl"], "--input / GRACE_INPUT"),
])
def test_a_bad_setting_fails_at_start_naming_it(tmp_path, capsys, args, named):
    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "pool.jsonl").write_text("{}\n")
    given = ["--params", str(tmp_path / "params.yaml"), "--input", str(tmp_path / "pool.jsonl")]
    with pytest.raises(SystemExit):
        spec_from_args(given + args, environ={})
    assert named in capsys.readouterr().err


def test_serving_without_an_api_is_refused_saying_what_to_start(tmp_path, capsys, monkeypatch):
    """Without PREFECT_API_URL Prefect would register on a temporary API that never fires the schedule."""
    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "pool.jsonl").write_text("{}\n")

    def serve(*args, **kwargs):
        raise AssertionError("served without an API")  # instead of serving forever

    monkeypatch.setattr(flows.serve.curate, "serve", serve)
    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(SystemExit) as refused:
        flows.serve.main(["--params", str(tmp_path / "params.yaml"), "--input", str(tmp_path / "pool.jsonl")])
    assert refused.value.code == flows.serve.NO_API  # printed to stderr as one line, exit status 1
    assert "prefect server start" in refused.value.code and "\n" not in refused.value.code
