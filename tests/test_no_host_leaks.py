"""What a submitter sees never carries the server's tracebacks or host paths; the log keeps them.

Kernels that fail to start (a kernelspec whose program is missing, one that dies with a Python traceback)
are installed into a private JUPYTER_PATH of a real server; the submission's message is a short generic
one with an incident id, and the server log holds that id with the details.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
from conftest import start_server
from http_client import post

from runflare_server.engine.interface import RunResult
from runflare_server.engine.runs.program_runs import ProgramRuns

pytestmark = pytest.mark.timeout(240)

MISSING = "/nonexistent/runflare-leak-test/bin/kernel"
KERNELS = {
    "rf-leak-missing": [MISSING, "-f", "{connection_file}"],
    "rf-leak-traceback": [sys.executable, "-c", "import sys; open(sys.argv[1] + '.missing')", "{connection_file}"],
}
INCIDENT = re.compile(r"\(incident ([0-9a-f]{12})\)$")


def test_kernel_start_failures_show_no_host_detail(tmp_path) -> None:
    jupyter = tmp_path / "jupyter"
    for name, argv in KERNELS.items():
        spec = jupyter / "kernels" / name
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": name, "language": "text"}))
    data = tmp_path / "data"
    data.mkdir()
    server = start_server(data, env={"JUPYTER_PATH": str(jupyter), "RUNFLARE_KERNEL_POOL": "{}"})
    try:
        for name in KERNELS:
            sub = post(f"{server.api}/submissions?wait=true", {"source_code": "1", "kernel": name}).json
            message = sub["message"]
            assert sub["status"]["id"] == 13, sub  # Internal Error
            assert "/" not in message and "Traceback" not in message and "File " not in message, message
            assert message.startswith(f"the {name} kernel could not start"), message
            incident = INCIDENT.search(message)
            assert incident, message
            for field in ("stdout", "stderr", "compile_output"):
                assert "Traceback" not in (sub.get(field) or "") and MISSING not in (sub.get(field) or "")
            log = (data / "server.log").read_text(errors="replace")
            assert f"incident {incident.group(1)}" in log  # the log keeps the details under the same id
        log = (data / "server.log").read_text(errors="replace")
        assert MISSING in log and "Traceback" in log
    finally:
        server.stop()


def test_program_run_results_are_made_public() -> None:
    """A host failure reported by the program-run kernel (its runner's `Type: text` message) becomes an
    incident; a compiler message naming the host work dir (no bwrap) names /box instead."""
    pr = ProgramRuns(1, runs_dir="/dev/shm/runflare-runs-0/pool-x")
    wd = "/dev/shm/runflare-runs-0/pool-x/" + "ab" * 16
    leaked = pr._public(RunResult("internal", message=f"FileNotFoundError: [Errno 2] No such file: '{wd}/main.c'"))
    assert "/" not in leaked.message and INCIDENT.search(leaked.message), leaked.message
    kept = pr._public(RunResult("internal", message="cannot split arguments: No closing quotation"))
    assert kept.message == "cannot split arguments: No closing quotation"
    compiled = pr._public(RunResult("compile_error", compile_output=f"{wd}/main.c:1:1: error: x",
                                    message="exited with code 1"))
    assert compiled.compile_output == "/box/main.c:1:1: error: x" and compiled.message == "exited with code 1"
    traced = pr._public(RunResult("exited", message='Traceback (most recent call last):\n  File "x.py"'))
    assert "Traceback" not in traced.message and INCIDENT.search(traced.message)
