"""Each Judge0 switch turned off, through a real server; wait_cap_seconds; deleting a running submission.

Runs that must still be going when the test looks at them wait for a line of stdin (interactive), which
the test sends over the WebSocket only afterwards: no timing decides what they see."""

from __future__ import annotations

import json

import pytest
from conftest import start_server, wait_until
from http_client import call, get, post
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

HELLO = {"source_code": 'print("Hello!")', "language_id": 71}
WAITS = {"source_code": "print(input())", "language_id": 71, "interactive": True}
LEAN = {"RUNFLARE_KERNEL_POOL": "{}"}


@pytest.fixture(scope="module")
def all_off(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("all-off"), "--workers", "1", "--authz-user", "boss", env={
        **LEAN, "RUNFLARE_ENABLE_WAIT_RESULT": "false", "RUNFLARE_ENABLE_COMPILER_OPTIONS": "false",
        "RUNFLARE_ENABLE_COMMAND_LINE_ARGUMENTS": "false", "RUNFLARE_ENABLE_SUBMISSION_DELETE": "false",
        "RUNFLARE_ENABLE_CALLBACKS": "false", "RUNFLARE_ENABLE_BATCHED_SUBMISSIONS": "false"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    """Compiler options only for C (50), a short wait cap, deletes allowed."""
    server = start_server(tmp_path_factory.mktemp("capped"), "--workers", "1", "--authz-user", "boss",
                          "--enable-submission-delete", env={
        **LEAN, "RUNFLARE_ALLOWED_LANGUAGES_FOR_COMPILE_OPTIONS": "[50]", "RUNFLARE_WAIT_CAP_SECONDS": "0.5"})
    yield server
    server.stop()


def release(server, token: str, line: str = "go") -> dict:
    """Send the waiting program its line of stdin and EOF; the final status_update."""
    with connect(server.url.replace("http://", "ws://") + f"/api/v1/submissions/{token}/ws") as ws:
        ws.send(json.dumps({"type": "stdin", "data": line + "\n", "eof": True}))
        last = None
        try:
            while True:
                last = json.loads(ws.recv(timeout=60))
        except ConnectionClosed:
            pass
    assert last is not None and last["type"] == "status_update", last
    return last


def test_config_info_reports_them_off(all_off):
    info = get(f"{all_off.api}/config_info").json
    for key in ("enable_wait_result", "enable_compiler_options", "enable_command_line_arguments",
                "enable_submission_delete", "enable_callbacks", "enable_batched_submissions"):
        assert info[key] is False, key


def test_wait_result_off(all_off):
    r = post(f"{all_off.api}/submissions?wait=true", HELLO)
    assert r.status == 400 and r.json == {"error": "wait not allowed"}
    assert post(f"{all_off.api}/submissions", HELLO).status == 201  # without wait it is accepted


def test_compiler_options_off(all_off):
    r = post(f"{all_off.api}/submissions", {**HELLO, "compiler_options": "-O2"})
    assert r.status == 422 and r.json == {"compiler_options": ["setting compiler options is not allowed"]}


def test_command_line_arguments_off(all_off):
    r = post(f"{all_off.api}/submissions", {**HELLO, "command_line_arguments": "a b"})
    assert r.status == 422
    assert r.json == {"command_line_arguments": ["setting command line arguments is not allowed"]}


def test_callbacks_off(all_off):
    r = post(f"{all_off.api}/submissions", {**HELLO, "callback_url": "http://callbacks.example/done"})
    assert r.status == 422 and r.json == {"callback_url": ["callbacks are not allowed"]}


def test_batched_submissions_off(all_off):
    r = post(f"{all_off.api}/submissions/batch", {"submissions": [HELLO]})
    assert r.status == 400 and r.json == {"error": "batched submissions are not allowed"}
    token = post(f"{all_off.api}/submissions", HELLO).json["token"]
    r = get(f"{all_off.api}/submissions/batch?tokens={token}")
    assert r.status == 400 and r.json == {"error": "batched submissions are not allowed"}


def test_submission_delete_off(all_off):
    token = post(f"{all_off.api}/submissions", HELLO).json["token"]
    wait_until(lambda: get(f"{all_off.api}/submissions/{token}").json["status"]["id"] >= 3)
    r = call("DELETE", f"{all_off.api}/submissions/{token}", headers={"X-Auth-User": "boss"})
    assert r.status == 400 and r.json == {"error": "delete not allowed"}
    assert get(f"{all_off.api}/submissions/{token}").status == 200  # still there


def test_compiler_options_only_for_allowed_languages(capped):
    r = post(f"{capped.api}/submissions", {**HELLO, "compiler_options": "-O2"})
    assert r.status == 422
    assert r.json == {"compiler_options": ["setting compiler options is not allowed for this language"]}
    if 50 not in {lang["id"] for lang in get(f"{capped.api}/languages").json}:
        pytest.skip("gcc not installed")
    src = '#include <stdio.h>\nint main(void){ printf("%d\\n", FOO); return 0; }\n'
    sub = post(f"{capped.api}/submissions?wait=true",
               {"source_code": src, "language_id": 50, "compiler_options": "-DFOO=42"}).json
    assert sub["status"]["id"] == 3 and sub["stdout"] == "42\n", sub


def test_wait_is_capped_by_wait_cap_seconds(capped):
    r = post(f"{capped.api}/submissions?wait=true&fields=*", WAITS)
    # the program waits for stdin that has not been sent: the wait ends at the cap with token and status only
    assert r.status == 201 and set(r.json) == {"token", "status"} and r.json["status"]["id"] in (1, 2), r.json
    final = release(capped, r.json["token"], "late")
    assert final["status"]["id"] == 3 and final["data"]["stdout"] == "late\n"


def test_running_submission_cannot_be_deleted(capped):
    boss = {"X-Auth-User": "boss"}
    token = post(f"{capped.api}/submissions", WAITS).json["token"]
    wait_until(lambda: get(f"{capped.api}/submissions/{token}").json["status"]["id"] == 2)
    r = call("DELETE", f"{capped.api}/submissions/{token}", headers=boss)
    assert r.status == 400
    assert r.json == {"error": "submission cannot be deleted because it is queued or running"}
    assert get(f"{capped.api}/submissions/{token}").json["status"]["id"] == 2  # untouched, still running
    assert release(capped, token)["status"]["id"] == 3
    r = call("DELETE", f"{capped.api}/submissions/{token}?fields=token,stdout", headers=boss)
    assert r.status == 200 and r.json == {"token": token, "stdout": "go\n"}
    assert get(f"{capped.api}/submissions/{token}").status == 404


def test_queued_submission_cannot_be_deleted(capped):
    boss = {"X-Auth-User": "boss"}
    running = post(f"{capped.api}/submissions", WAITS).json["token"]  # holds the only worker
    wait_until(lambda: get(f"{capped.api}/submissions/{running}").json["status"]["id"] == 2)
    queued = post(f"{capped.api}/submissions", HELLO).json["token"]
    assert get(f"{capped.api}/submissions/{queued}").json["status"]["id"] == 1
    r = call("DELETE", f"{capped.api}/submissions/{queued}", headers=boss)
    assert r.status == 400 and "queued or running" in r.json["error"]
    release(capped, running)
    wait_until(lambda: get(f"{capped.api}/submissions/{queued}").json["status"]["id"] == 3)
