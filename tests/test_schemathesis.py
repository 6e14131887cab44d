"""Schemathesis holds a real server to its own /api/v1/openapi.json: every check, with the coverage, fuzzing and
stateful phases, bounded to a few minutes on a 2-core machine (max examples per operation, request timeout).

The server has auth on (X-Auth-Token, and X-Auth-User for listing and deleting) so `ignored_auth` tests that the
declared security is enforced, and deletion on so DELETE is exercised. Everything stays on loopback.

Each exception below names the operation, the check and the reason. No check is switched off globally.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import start_server

pytestmark = pytest.mark.slow

TOKEN, USER = "fuzz-token", "fuzz-user"
SEED = os.environ.get("RUNFLARE_FUZZ_SEED", "20261202")  # fixed: CI is repeatable; set it to explore further

# Per-operation exceptions, each with its reason. Everything else runs every check with its defaults.
CONFIG = """
[generation]
database = "none"

[[operations]]
include-operation-id = "createSubmission"
# Schema-valid bodies the server rightly refuses with 422 for a reason JSON Schema cannot state: with the
# query parameter base64_encoded=true, source_code/stdin/expected_output must be base64 (a dependency
# between a query parameter and the body), and a callback_url host is refused once it resolves.
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429", "5xx"]

[[operations]]
include-operation-id = "deleteSubmission"
# As in Judge0, deleting a submission that is still queued or running is 400: a matter of its state when
# the request arrives, not of the request's shape.
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429", "5xx"]

[[operations]]
include-operation-id = "followSubmission"
# A WebSocket route: a plain HTTP GET (all an HTTP fuzzer sends) is 426 Upgrade Required by design; the
# upgrade itself is tested in tests/test_websocket.py.
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "426", "429", "5xx"]
"""


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("fuzzed"), "--auth-token", TOKEN, "--authz-user", USER,
                          "--enable-submission-delete", "--workers", "1",
                          # A queue that never fills: a 5xx is a failure here, and the full queue's 503 with
                          # Retry-After has its own test (test_api_config.py::test_queue_full_is_503).
                          env={"RUNFLARE_KERNEL_POOL": "{}", "RUNFLARE_WAIT_CAP_SECONDS": "2",
                               "RUNFLARE_MAX_QUEUE_SIZE": "1000000"})
    yield server
    server.stop()


def schemathesis_cli() -> list[str]:
    found = shutil.which("schemathesis", path=os.path.dirname(sys.executable))
    return [found] if found else [sys.executable, "-m", "schemathesis.cli"]


def test_openapi_holds_under_schemathesis(fuzzed_server, tmp_path: Path):
    pytest.importorskip("schemathesis")
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    cmd = [*schemathesis_cli(), "--config-file", str(config), "--no-color", "run",
           f"{fuzzed_server.api}/openapi.json",
           "--checks", "all",
           "--phases", "examples,coverage,fuzzing,stateful",
           "--max-examples", os.environ.get("RUNFLARE_FUZZ_EXAMPLES", "40"),
           "--seed", SEED,
           # One worker: schemathesis' coverage phase draws through hypothesis, whose lambda descriptions call
           # ast.parse, which is not thread-safe on CPython 3.11 ("AST constructor recursion depth mismatch").
           "--workers", "1",
           "--request-timeout", "30",
           "--header", f"X-Auth-Token: {TOKEN}", "--header", f"X-Auth-User: {USER}",
           "--report", "junit", "--report-dir", str(tmp_path / "report")]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                         env={**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"})
    output = run.stdout + run.stderr
    print(output[-4000:])  # the summary: phases, operations, cases generated
    assert run.returncode == 0, output[-20000:]
    assert "Coverage" in output and "Fuzzing" in output and "Stateful" in output, output[-5000:]
