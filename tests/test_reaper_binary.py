"""The compiled reaper: built once into the user's cache, handed to sandboxes as a sealed read-only memfd,
used by the Run-Flare kernel's runner where the host has a C compiler, the Perl reaper otherwise. What it
does inside a sandbox (limits, stdin, argv, launch failures, the fds a program holds) is tested against both
reapers in test_ready_sandbox.py."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
from conftest import skip_or_fail

from runflare_server.kernels import reaper_binary


@pytest.fixture
def reaper_fd() -> int:
    fd = reaper_binary.fd()
    if fd is None:
        skip_or_fail("no C compiler to build the compiled reaper")
    return fd


def test_it_is_a_sealed_read_only_memfd(reaper_fd):
    assert os.readlink(f"/proc/self/fd/{reaper_fd}").startswith("/memfd:runflare-reaper")
    assert stat.S_IMODE(os.fstat(reaper_fd).st_mode) == 0o555
    with pytest.raises(OSError):
        os.write(reaper_fd, b"x")
    writable = os.open(f"/proc/self/fd/{reaper_fd}", os.O_WRONLY)  # root may open it so, and still cannot
    try:  # write it (F_SEAL_WRITE)
        with pytest.raises(PermissionError):
            os.write(writable, b"x")
    finally:
        os.close(writable)
    assert not os.get_inheritable(reaper_fd)  # only pass_fds hands it to a sandbox


def test_an_empty_message_runs_nothing_and_a_malformed_one_fails_the_launch(reaper_fd, tmp_path):
    status_r, status_w = os.pipe()
    try:
        done = subprocess.run([f"/proc/self/fd/{reaper_fd}", str(status_w), "0", str(reaper_fd)], input=b"",
                              pass_fds=(status_w, reaper_fd), timeout=10)
        assert done.returncode == 0
        done = subprocess.run([f"/proc/self/fd/{reaper_fd}", str(status_w), "0", str(reaper_fd)],
                              input=b"2\x000\x001", pass_fds=(status_w, reaper_fd), timeout=10)
        assert done.returncode == 125
    finally:
        os.close(status_w)
    with os.fdopen(status_r, "rb") as status:
        assert status.read() == b"launch malformed message\n"


def test_without_a_c_compiler_there_is_no_compiled_reaper(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setattr(reaper_binary.shutil, "which", lambda name: None)
    assert reaper_binary._build() is None
    assert not any(tmp_path.rglob("reaper-*"))


def test_it_is_built_once_into_a_private_cache(monkeypatch, tmp_path):
    if reaper_binary.shutil.which("cc") is None and reaper_binary.shutil.which("gcc") is None:
        skip_or_fail("no C compiler")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = reaper_binary._build()
    (cached,) = tmp_path.rglob("reaper-*")
    assert stat.S_IMODE(cached.parent.stat().st_mode) == 0o700
    monkeypatch.setattr(reaper_binary.shutil, "which", lambda name: None)  # the cache alone serves it now
    assert reaper_binary._build() == first == cached.read_bytes()
