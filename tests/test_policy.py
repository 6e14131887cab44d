"""The sandbox policy's own checks: the uid range, uid leases, and a server that refuses a bad range."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import start_server

from runflare_server.engine.sandbox import policy

pytestmark = pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"),
                                reason="per-slot uids need root (CI runs as root)")


def test_default_range_is_clear_of_accounts_and_subuids():
    policy.UidRange.from_env().check()


@pytest.mark.parametrize("text, words", [
    ("0:100", "must lie within"),
    ("65000:1000", "holds existing accounts"),  # nobody/nogroup (65534)
    ("abc", "expected BASE:COUNT"),
])
def test_bad_ranges_say_what_is_wrong(monkeypatch, text, words):
    monkeypatch.setenv(policy.UIDS_ENV, text)
    with pytest.raises(policy.SandboxConfigError, match=words):
        policy.UidRange.from_env().check()


def test_range_overlapping_subuid_is_refused(tmp_path, monkeypatch):
    subuid = tmp_path / "subuid"
    subuid.write_text("builder:1900000100:65536\n")
    monkeypatch.setattr(policy, "_lines", lambda path: subuid.read_text().split() if path == "/etc/subuid" else [])
    with pytest.raises(policy.SandboxConfigError, match="overlaps /etc/subuid"):
        policy.UidRange(1900000000, 1000).check()


def test_leases_are_exclusive_across_processes_and_freed_by_death():
    uids = policy.UidRange(1900060000, 64)
    first = policy.UidLease.acquire(uids=uids)
    second = policy.UidLease.acquire(uids=uids)
    assert first.uid != second.uid and {first.uid, second.uid} <= set(range(uids.base, uids.base + 64))
    # another process cannot take a held uid; when it dies holding one, the uid is free again
    code = ("import sys; sys.path[:0] = %r\n"
            "from runflare_server.engine.sandbox import policy\n"
            "l = policy.UidLease.acquire(uids=policy.UidRange(1900060000, 64)); print(l.uid, flush=True)\n"
            "import os; os._exit(0)") % (sys.path,)
    other = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert other not in (first.uid, second.uid)
    again = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert again == other  # the dead holder's uid was free again
    first.release()
    third = policy.UidLease.acquire(uids=uids)
    assert third.uid == first.uid
    second.release()
    third.release()
    assert oct(Path(policy.LEASE_DIR).stat().st_mode & 0o777) == "0o700"  # sandboxes cannot hold or free leases


def test_a_block_lease_is_consecutive_and_exhaustion_is_an_error():
    uids = policy.UidRange(1900060000, 64)
    block = policy.UidLease.acquire(32, uids=uids)
    try:
        assert block.count == 32 and (block.first - uids.base) % 32 == 0
        other = policy.UidLease.acquire(32, uids=uids)
        try:
            with pytest.raises(policy.SandboxConfigError, match="no 32 free sandbox uids"):
                policy.UidLease.acquire(32, uids=uids)
        finally:
            other.release()
    finally:
        block.release()


def test_server_refuses_to_start_on_a_range_with_accounts(tmp_path):
    with pytest.raises(RuntimeError, match="holds existing accounts"):
        start_server(tmp_path, env={"RUNFLARE_SANDBOX_UIDS": "65000:1000", "RUNFLARE_KERNEL_POOL": "{}"})
