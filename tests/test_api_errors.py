"""Bad input gets a clear answer in Judge0's shapes, never a 500 or a traceback."""

from __future__ import annotations

import pytest
from http_client import call, get, post

HELLO = {"source_code": 'print("Hello!")', "language_id": 71}


def test_wrong_content_type_is_415(live_server):
    r = post(f"{live_server.api}/submissions", raw=b"source_code=x", content_type="application/x-www-form-urlencoded")
    assert r.status == 415 and "application/json" in r.json["error"]


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b'{"a": }'])
def test_malformed_json_is_400(live_server, raw):
    r = post(f"{live_server.api}/submissions", raw=raw)
    assert r.status == 400 and r.json["error"].startswith("malformed JSON")


def test_body_not_an_object_is_422(live_server):
    r = post(f"{live_server.api}/submissions", [1, 2])
    assert r.status == 422


@pytest.mark.parametrize(("change", "errors"), [
    ({"language_id": 999}, {"language_id": ["language with id 999 doesn't exist"]}),
    ({"language_id": None}, {"language_id": ["can't be blank"]}),
    ({"source_code": ""}, {"source_code": ["can't be blank"]}),
    ({"cpu_time_limit": 16}, {"cpu_time_limit": ["must be less than or equal to 15"]}),
    ({"cpu_time_limit": -1}, {"cpu_time_limit": ["must be greater than or equal to 0"]}),
    ({"wall_time_limit": 21}, {"wall_time_limit": ["must be less than or equal to 20"]}),
    ({"memory_limit": 1000}, {"memory_limit": ["must be greater than or equal to 2048"]}),
    ({"memory_limit": "lots"}, {"memory_limit": ["is not a number"]}),
    ({"cpu_time_limit": float("nan")}, {"cpu_time_limit": ["is not a number"]}),
    ({"wall_time_limit": float("inf")}, {"wall_time_limit": ["is not a number"]}),
    ({"redirect_stderr_to_stdout": "maybe"}, {"redirect_stderr_to_stdout": ["is not a boolean"]}),
    ({"stdin": ["a"]}, {"stdin": ["must be a string"]}),
    ({"number_of_runs": 21}, {"number_of_runs": ["must be less than or equal to 20"]}),
    ({"max_file_size": 5000}, {"max_file_size": ["must be less than or equal to 4096"]}),
    ({"stack_limit": 128001}, {"stack_limit": ["must be less than or equal to 128000"]}),
    ({"max_processes_and_or_threads": 0}, {"max_processes_and_or_threads": ["must be greater than or equal to 1"]}),
    ({"command_line_arguments": "x" * 513}, {"command_line_arguments": ["is too long (maximum is 512 characters)"]}),
    ({"callback_url": "ftp://example.com/x"}, {"callback_url": ["must be an http(s) URL"]}),
    ({"enable_network": True}, {"enable_network": ["enabling network is not allowed"]}),
    ({"additional_files": "UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA=="},
     {"additional_files": ["additional files are not supported by this server"]}),
    ({"kernel": "no-such-kernel"}, {"kernel": ["kernel 'no-such-kernel' is not installed"]}),
    ({"kernel": "python3", "language_id": 99999}, {"language_id": ["language with id 99999 doesn't exist"]}),
    ({"stdin": "\ud800"}, {"stdin": ["is not valid UTF-8"]}),
    ({"expected_output": "\udcff"}, {"expected_output": ["is not valid UTF-8"]}),
    ({"callback_url": "http://[oops/"}, {"callback_url": ["must be an http(s) URL"]}),
])
def test_field_errors_are_422_in_judge0_shape(live_server, change, errors):
    r = post(f"{live_server.api}/submissions", {**HELLO, **change})
    assert r.status == 422
    assert r.json == errors


def test_several_field_errors_at_once(live_server):
    r = post(f"{live_server.api}/submissions", {"language_id": 999, "cpu_time_limit": 100})
    assert r.status == 422
    assert set(r.json) == {"source_code", "language_id", "cpu_time_limit"}


def test_source_too_long(live_server):
    r = post(f"{live_server.api}/submissions", {**HELLO, "source_code": "#" * (64 * 1024 + 1)})
    assert r.status == 422 and "too long" in r.json["source_code"][0]


@pytest.mark.parametrize("text", ["%%%not base64", "abc", "!!!!"])
def test_bad_base64_is_422(live_server, text):
    r = post(f"{live_server.api}/submissions?base64_encoded=true", {"source_code": text, "language_id": 71})
    assert r.status == 422 and r.json == {"source_code": ["is not valid base64"]}


def test_wrapped_base64_is_accepted(live_server):
    import base64
    import textwrap

    source = "print('" + "x" * 100 + "')"
    wrapped = "\n".join(textwrap.wrap(base64.b64encode(source.encode()).decode(), 60)) + "\n"
    sub = post(f"{live_server.api}/submissions?base64_encoded=true&wait=true", {"source_code": wrapped,
                                                                               "language_id": 71}).json
    assert base64.b64decode(sub["stdout"]).decode() == "x" * 100 + "\n"


def test_bad_query_values_are_not_500(live_server):
    assert get(f"{live_server.api}/languages?X-Auth-Token=%ff").status == 200
    assert get(f"{live_server.api}/submissions?page=" + "9" * 30, headers={"X-Auth-User": "x"}).status == 403


def test_unknown_body_keys_are_ignored(live_server):
    r = post(f"{live_server.api}/submissions", {**HELLO, "whatever": 1})
    assert r.status == 201


def test_unknown_token_and_route_are_404(live_server):
    r = get(f"{live_server.api}/submissions/00000000-0000-0000-0000-000000000000")
    assert r.status == 404 and r.json == {"error": "Not Found"}
    assert get(f"{live_server.api}/nothing/here").status == 404
    assert get(f"{live_server.api}/languages/12345").status == 404


def test_listing_is_forbidden_until_users_are_configured(live_server):
    assert get(f"{live_server.api}/submissions").status == 403
    r = get(f"{live_server.api}/submissions?per_page=2", headers={"X-Auth-User": "teacher"})
    assert r.status == 403 and r.body == b""


def test_delete_disabled_by_default(live_server):
    token = post(f"{live_server.api}/submissions?wait=true&fields=token", HELLO).json["token"]
    r = call("DELETE", f"{live_server.api}/submissions/{token}", headers={"X-Auth-User": "teacher"})
    assert r.status == 403
    assert get(f"{live_server.api}/submissions/{token}").status == 200
