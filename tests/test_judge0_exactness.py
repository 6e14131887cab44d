"""Judge0 exactness, key by key (../shared/judge0-reference.md): a client with a strict model of Judge0's submission
reads every GET shape; (RF) fields come only when named; decimals as strings; base64 `message`; number_of_runs;
TypeScript type-checked like tsc; strict query flags; 405 with Allow; an OpenAPI document that declares it all."""

from __future__ import annotations

import base64
import json

from http_client import call, get, post
from pydantic import BaseModel, ConfigDict
from websockets.sync.client import connect

HELLO = {"source_code": 'print("Hello!")', "language_id": 71}

# Judge0's `fields=*`, from judge0-reference.md, in its order.
JUDGE0_KEYS = (
    "source_code language_id stdin expected_output stdout status_id created_at finished_at time memory stderr token "
    "number_of_runs cpu_time_limit cpu_extra_time wall_time_limit memory_limit stack_limit "
    "max_processes_and_or_threads enable_per_process_and_thread_time_limit enable_per_process_and_thread_memory_limit "
    "max_file_size compile_output exit_code exit_signal message wall_time compiler_options command_line_arguments "
    "redirect_stderr_to_stdout callback_url additional_files enable_network status language"
).split()
RF_KEYS = {"kernel", "interactive", "outputs", "session"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Judge0Status(Strict):
    id: int
    description: str


class Judge0Language(Strict):
    id: int
    name: str


class Judge0Submission(Strict):
    """What a strict Judge0 client maps `fields=*` onto (kept here, independent of the server's models):
    every key required, no other key allowed, Judge0's types (decimal limits and times as strings, KB as ints)."""

    source_code: str
    language_id: int
    stdin: str | None
    expected_output: str | None
    stdout: str | None
    status_id: int
    created_at: str
    finished_at: str | None
    time: str | None
    memory: int | None
    stderr: str | None
    token: str
    number_of_runs: int
    cpu_time_limit: str
    cpu_extra_time: str
    wall_time_limit: str
    memory_limit: int
    stack_limit: int
    max_processes_and_or_threads: int
    enable_per_process_and_thread_time_limit: bool
    enable_per_process_and_thread_memory_limit: bool
    max_file_size: int
    compile_output: str | None
    exit_code: int | None
    exit_signal: int | None
    message: str | None
    wall_time: str | None
    compiler_options: str | None
    command_line_arguments: str | None
    redirect_stderr_to_stdout: bool
    callback_url: str | None
    additional_files: str | None
    enable_network: bool
    status: Judge0Status
    language: Judge0Language


class Judge0Default(Strict):
    """Judge0's default fields."""

    token: str
    time: str | None
    memory: int | None
    stdout: str | None
    stderr: str | None
    compile_output: str | None
    message: str | None
    status: Judge0Status


def strict(sub: dict) -> Judge0Submission:
    assert list(Judge0Submission.model_fields) == JUDGE0_KEYS
    return Judge0Submission.model_validate(sub)


def test_every_get_shape_fits_a_strict_judge0_model(live_server):
    api = live_server.api
    waited = post(f"{api}/submissions?wait=true&fields=*", {**HELLO, "stdin": "x"})
    assert waited.status == 201
    sub = strict(waited.json)
    assert sub.status.id == 3 and sub.stdout == "Hello!\n" and sub.stdin == "x"
    token = sub.token
    strict(get(f"{api}/submissions/{token}?fields=*").json)
    encoded = strict(get(f"{api}/submissions/{token}?fields=*&base64_encoded=true").json)
    assert base64.b64decode(encoded.stdout).decode() == "Hello!\n"
    assert base64.b64decode(encoded.source_code).decode() == HELLO["source_code"]
    batch = get(f"{api}/submissions/batch?tokens={token},{token}&fields=*").json
    assert [strict(item).token for item in batch["submissions"]] == [token, token]
    b64_batch = get(f"{api}/submissions/batch?tokens={token}&fields=*&base64_encoded=true").json
    strict(b64_batch["submissions"][0])
    Judge0Default.model_validate(get(f"{api}/submissions/{token}").json)
    Judge0Default.model_validate(post(f"{api}/submissions?wait=true", HELLO).json)
    # a program that fails to compile, and one that fails at run time: nulls where Judge0 has them
    strict(post(f"{api}/submissions?wait=true&fields=*", {"source_code": "int main( {", "language_id": 50}).json)
    strict(post(f"{api}/submissions?wait=true&fields=*",
                {"source_code": "import sys; sys.exit(3)", "language_id": 71, "expected_output": "x"}).json)


def test_rf_fields_only_when_named(live_server):
    api = live_server.api
    token = post(f"{api}/submissions?wait=true&fields=token", HELLO).json["token"]
    assert list(get(f"{api}/submissions/{token}?fields=*").json) == JUDGE0_KEYS
    assert list(get(f"{api}/submissions/{token}?fields=*&base64_encoded=true").json) == JUDGE0_KEYS
    both = get(f"{api}/submissions/{token}?fields=*,outputs,session").json
    assert set(both) == set(JUDGE0_KEYS) | {"outputs", "session"}
    assert both["outputs"] == [] and both["session"]["kind"] == "program"
    assert get(f"{api}/submissions/{token}?fields=stdout,outputs").json == {"stdout": "Hello!\n", "outputs": []}
    rf = get(f"{api}/submissions/{token}?fields=kernel,interactive").json
    assert rf == {"kernel": None, "interactive": False}
    assert set(get(f"{api}/submissions/{token}?fields=*,*,%20status").json) == set(JUDGE0_KEYS)
    waited = post(f"{api}/submissions?wait=true&fields=*,outputs", HELLO).json
    assert set(waited) == set(JUDGE0_KEYS) | {"outputs"}
    for bad, names in (("*,nope", "nope"), ("stdout,outputz,bogus", "outputz, bogus"), ("stdout\n", "stdout\n")):
        r = get(f"{api}/submissions/{token}?fields=" + bad.replace("\n", "%0A"))
        assert r.status == 400 and r.json == {"error": f"invalid fields: [{names}]"}


def test_decimal_limits_echoed_as_strings(live_server):
    sub = post(f"{live_server.api}/submissions?wait=true&fields=*",
               {**HELLO, "cpu_time_limit": 2, "cpu_extra_time": 0.5, "wall_time_limit": 7.25}).json
    assert (sub["cpu_time_limit"], sub["cpu_extra_time"], sub["wall_time_limit"]) == ("2.0", "0.5", "7.25")
    default = post(f"{live_server.api}/submissions?wait=true&fields=*", HELLO).json
    assert (default["cpu_time_limit"], default["cpu_extra_time"], default["wall_time_limit"]) == ("5.0", "1.0", "10.0")
    assert default["memory_limit"] == 128000 and default["stack_limit"] == 64000 and default["max_file_size"] == 1024


def test_base64_encodes_message_too(live_server):
    body = {"source_code": base64.b64encode(b"import sys; sys.exit(3)").decode(), "language_id": 71}
    sub = post(f"{live_server.api}/submissions?wait=true&base64_encoded=true&fields=message,status,exit_code",
               body).json
    assert sub["status"]["id"] == 11 and sub["exit_code"] == 3
    assert base64.b64decode(sub["message"]).decode() == "exited with code 3"
    plain = get(f"{live_server.api}/submissions/batch?tokens=x").json
    assert plain == {"submissions": [None]}


def run_stages(api: str, body: dict) -> tuple[dict, list[str]]:
    """Create a submission and follow it to the end: its final answer and the stages its runs went through."""
    token = post(f"{api}/submissions", body).json["token"]
    stages = []
    with connect(f"{api.replace('http', 'ws', 1)}/submissions/{token}/ws", open_timeout=30) as ws:
        for raw in ws:
            msg = json.loads(raw)
            if msg["type"] == "progress_update" and "stage" in msg and "stream" not in msg and "display" not in msg:
                stages.append(msg["stage"])
    return get(f"{api}/submissions/{token}?fields=*").json, stages


def test_number_of_runs_runs_each_time_and_stops_at_the_first_failure(live_server):
    sub, stages = run_stages(live_server.api, {**HELLO, "number_of_runs": 3})
    assert sub["status"]["id"] == 3 and sub["stdout"] == "Hello!\n" and stages.count("running") == 3
    sub, stages = run_stages(live_server.api, {"source_code": "import sys; sys.exit(2)", "language_id": 71,
                                               "number_of_runs": 3})
    assert sub["status"]["id"] == 11 and stages.count("running") == 1
    sub, stages = run_stages(live_server.api, {**HELLO, "number_of_runs": 3, "expected_output": "Bye"})
    assert sub["status"]["id"] == 4 and stages.count("running") == 1


def test_number_of_runs_averages_time_and_memory():
    from runflare_server.engine.interface import RunResult
    from runflare_server.worker import combine

    runs = [RunResult("exited", stdout="a", time=0.1, wall_time=0.3, memory=1000),
            RunResult("exited", stdout="a", time=0.2, wall_time=0.5, memory=2001),
            RunResult("exited", stdout="b", time=0.6, wall_time=1.0, memory=3000)]
    last = combine(runs)
    assert last.stdout == "b"  # the last run's outcome and output
    assert abs(last.time - 0.3) < 1e-9 and abs(last.wall_time - 0.6) < 1e-9 and last.memory == 2000


def test_typescript_is_type_checked_like_tsc(live_server):
    api = live_server.api
    if 74 not in [lang["id"] for lang in get(f"{api}/languages").json]:
        import pytest

        pytest.skip("deno is not installed")
    bad = post(f"{api}/submissions?wait=true&fields=status,compile_output,stdout",
               {"source_code": 'const x: number = "s";\nconsole.log(x);\n', "language_id": 74}).json
    assert bad["status"] == {"id": 6, "description": "Compilation Error"}
    assert "TS2322" in bad["compile_output"] and "not assignable to type 'number'" in bad["compile_output"]
    assert not bad["stdout"]
    good = post(f"{api}/submissions?wait=true&fields=status,compile_output,stdout",
                {"source_code": "const x: number = 41;\nconsole.log(x + 1);\n", "language_id": 74}).json
    assert good["status"]["id"] == 3 and good["stdout"] == "42\n"
    assert " check " in get(f"{api}/languages/74").json["compile_cmd"]


def test_boolean_query_parameters_are_true_or_false(live_server):
    api = live_server.api
    for query in ("wait=1", "wait=yes", "wait=True", "base64_encoded=1", "base64_encoded=%20true"):
        r = post(f"{api}/submissions?{query}", HELLO)
        assert r.status == 400 and "must be true or false" in r.json["error"], query
    assert get(f"{api}/submissions/batch?tokens=x&base64_encoded=0").status == 400
    assert post(f"{api}/submissions?wait=false&base64_encoded=false", HELLO).status == 201


def test_other_methods_are_405_with_allow(live_server):
    api = live_server.api
    for method, path, allow in (("PUT", "/statuses", "GET, OPTIONS"), ("PATCH", "/submissions", "GET, OPTIONS, POST"),
                                ("TRACE", "/languages", "GET, OPTIONS"), ("POST", "/submissions/x/ws", "GET"),
                                ("PUT", "/submissions/x", "DELETE, GET, OPTIONS")):
        r = call(method, f"{api}{path}")
        assert r.status == 405 and r.headers["Allow"] == allow, (method, path)


def test_openapi_declares_what_the_server_answers(live_server):
    doc = get(f"{live_server.api}/openapi.json").json
    create = doc["paths"]["/submissions"]["post"]
    assert {"201", "400", "401", "413", "415", "422", "503"} <= set(create["responses"])
    assert create["responses"]["503"]["headers"]["Retry-After"]["required"] is True
    params = {p["name"]: p["schema"] for p in create["parameters"]}
    assert params["wait"] == {"type": "boolean"} and params["base64_encoded"] == {"type": "boolean"}
    assert {"200", "400", "403"} <= set(doc["paths"]["/submissions"]["get"]["responses"])
    assert {"200", "400", "404"} <= set(doc["paths"]["/submissions/{token}"]["get"]["responses"])
    assert {"400", "404", "426"} <= set(doc["paths"]["/submissions/{token}/ws"]["get"]["responses"])
    view = doc["components"]["schemas"]["SubmissionView"]
    assert view["additionalProperties"] is False and set(view["properties"]) == set(JUDGE0_KEYS) | RF_KEYS
    assert view["properties"]["status_id"] == {"type": "integer", "title": "Status Id"}  # never null
    assert {"type": "null"} in view["properties"]["finished_at"]["anyOf"]
    ids = doc["components"]["schemas"]["SubmissionCreate"]["properties"]["language_id"]["anyOf"][0]["enum"]
    assert set(ids) == {lang["id"] for lang in get(f"{live_server.api}/languages/all").json}
