"""Flow tests: a throwaway Prefect API for the session, with Prefect's home in a temporary directory.

PREFECT_HOME must be set before prefect is first imported (its settings are read then), so it is
set here at import time, before any flow test module imports prefect; a PREFECT_HOME already set
(CI sets one) is kept.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="grace-prefect-home-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], True)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry calls from test servers

import pytest  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect API server on a throwaway SQLite database, shared by the session's flow runs."""
    with prefect_test_harness(server_startup_timeout=120):  # two busy cores: a cold start takes tens of seconds
        yield
