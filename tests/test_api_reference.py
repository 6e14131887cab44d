"""Reference routes: languages, statuses, about, config_info, health, openapi."""

from __future__ import annotations

import re

from http_client import get

JUDGE0_CONFIG_KEYS = """maintenance_mode enable_wait_result enable_compiler_options allowed_languages_for_compile_options
enable_command_line_arguments enable_submission_delete enable_callbacks callbacks_max_tries callbacks_timeout
enable_additional_files max_queue_size cpu_time_limit max_cpu_time_limit cpu_extra_time max_cpu_extra_time
wall_time_limit max_wall_time_limit memory_limit max_memory_limit stack_limit max_stack_limit
max_processes_and_or_threads max_max_processes_and_or_threads enable_per_process_and_thread_time_limit
allow_enable_per_process_and_thread_time_limit enable_per_process_and_thread_memory_limit
allow_enable_per_process_and_thread_memory_limit max_file_size max_max_file_size number_of_runs max_number_of_runs
redirect_stderr_to_stdout max_extract_size enable_batched_submissions max_submission_batch_size
submission_cache_duration use_docs_as_homepage allow_enable_network enable_network""".split()


def test_languages_sorted_with_versions(live_server):
    langs = get(f"{live_server.api}/languages").json
    assert all(set(lang) == {"id", "name"} for lang in langs)
    names = [lang["name"].lower() for lang in langs]
    assert names == sorted(names)
    python = next(lang for lang in langs if lang["id"] == 71)

    assert re.fullmatch(r"Python \(3\.\d+\.\d+\)", python["name"])


def test_language_detail_and_all(live_server):
    detail = get(f"{live_server.api}/languages/71").json
    assert {"id", "name", "is_archived", "source_file", "compile_cmd", "run_cmd", "kernel"} <= set(detail)
    assert detail["id"] == 71 and detail["source_file"].endswith(".py")
    every = get(f"{live_server.api}/languages/all").json
    assert all("is_archived" in lang for lang in every)


def test_statuses(live_server):
    statuses = get(f"{live_server.api}/statuses").json
    assert [s["id"] for s in statuses] == list(range(1, 15))
    assert statuses[2] == {"id": 3, "description": "Accepted"}
    assert statuses[10] == {"id": 11, "description": "Runtime Error (NZEC)"}


def test_about(live_server):
    assert set(get(f"{live_server.api}/about").json) == {"version", "homepage", "source_code", "maintainer"}


def test_config_info_has_every_judge0_key(live_server):
    info = get(f"{live_server.api}/config_info").json
    assert set(JUDGE0_CONFIG_KEYS) <= set(info)
    assert info["cpu_time_limit"] == 5.0 and info["max_cpu_time_limit"] == 15.0
    assert info["max_queue_size"] == 100 and info["enable_wait_result"] is True


def test_health(live_server):
    health = get(f"{live_server.api}/health").json
    assert health["store"]["reachable"] is True and health["broker"]["reachable"] is True
    assert isinstance(health["queue_depth"], int)
    assert "engine" in health


def test_openapi_generated_from_models(live_server):
    doc = get(f"{live_server.api}/openapi.json").json
    assert doc["openapi"].startswith("3.")
    assert "/submissions" in doc["paths"] and "/submissions/{token}/ws" in doc["paths"]
    create = doc["components"]["schemas"]["SubmissionCreate"]["properties"]
    assert {"source_code", "language_id", "kernel", "interactive", "cpu_time_limit"} <= set(create)
