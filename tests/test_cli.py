"""The `runflare` command line: help documents every setting, languages are detected, bad input is refused."""

from __future__ import annotations

import os
import subprocess
import sys

from runflare_server.config import Settings


def runflare(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runflare_server", *args], capture_output=True, text=True,
                          timeout=120, **kw)


def test_help_lists_commands():
    out = runflare("--help")
    assert out.returncode == 0
    for command in ("serve", "run", "languages", "install-kernels"):
        assert command in out.stdout


def test_serve_help_documents_every_setting():
    out = runflare("serve", "--help").stdout
    for option in ("--host", "--port", "--data-dir", "--sandbox", "--workers", "--auth-token", "--cors-origin"):
        assert option in out
    for name in Settings.model_fields:
        assert f"RUNFLARE_{name.upper()} =" in out


def test_languages_lists_detected_toolchains():
    out = runflare("languages")
    assert out.returncode == 0
    assert any(line.split()[0] == "71" and "Python (3." in line for line in out.stdout.splitlines())


def test_run_help_is_the_terminal_client():
    out = runflare("run", "--help")
    assert out.returncode == 0 and "--language" in out.stdout and "--json" in out.stdout


def test_bad_setting_in_environment_is_a_clear_error(tmp_path):
    import os

    out = runflare("serve", "--data-dir", str(tmp_path), env={**os.environ, "RUNFLARE_PORT": "not-a-port"})
    assert out.returncode != 0 and "port" in out.stderr.lower()


def test_role_without_shared_broker_is_refused(tmp_path):
    out = runflare("serve", "--data-dir", str(tmp_path), "--role", "worker", "--port", "0")
    assert out.returncode != 0 and "broker" in out.stderr


def test_serve_started_through_a_path_the_sandbox_cannot_walk_still_runs_kernels(tmp_path, monkeypatch):
    """`../.venv/bin/python -m runflare_server serve` from a directory no sandbox shows (here the test's
    tmp dir; Python makes such a relative path absolute without resolving "..") still starts its kernels:
    they are named by the interpreter's plain path."""
    from conftest import start_server
    from http_client import post

    relative = os.path.relpath(sys.executable, tmp_path)
    assert relative.startswith("..")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "executable", relative)
    live = start_server(tmp_path, env={"RUNFLARE_KERNEL_POOL": '{"python3": 1}'})
    try:
        sub = post(live.api + "/submissions?wait=true", {"source_code": "print(6 * 7)", "language_id": 1071}).json
        assert sub["status"]["id"] == 3, sub
        assert sub["stdout"] == "42\n"
    finally:
        live.stop()
