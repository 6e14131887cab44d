"""Run groups made ahead (cgroups.GroupPool) and joined through v1's ``tasks``: each run still starts from
zero, every limit still holds, nothing of a run survives it, and nothing of the pool survives the runner."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import skip_or_fail

from runflare_server.engine.interface import Limits
from runflare_server.engine.sandbox import cgroups
from runflare_server.engine.sandbox import process as sandbox
from runflare_server.kernels.runner import Runner

PY = os.path.realpath(sys.executable)


def require_cgroups() -> None:
    if cgroups.mechanism() == "rlimit":
        skip_or_fail("no writable cgroup hierarchy here")


@pytest.fixture
def runner():
    require_cgroups()
    if sandbox.resolve_mode("auto") != "bwrap":
        skip_or_fail("bwrap is missing")
    r = Runner(subreaper=True)
    yield r
    r.close()
    if r.lease:
        r.lease.release()


def ready(pool: cgroups.GroupPool, n: int = 2, timeout: float = 20) -> None:
    """Wait until the pool holds n groups (so the next run takes one made ahead)."""
    deadline = time.monotonic() + timeout
    while pool.ready_count() < n:
        assert time.monotonic() < deadline, "the group pool never filled"
        time.sleep(0.01)


def my_groups() -> set[str]:
    """This process's run groups, by name."""
    parent = next(iter(cgroups._detect()[1].values()))
    return {p.name for p in parent.iterdir() if p.name.startswith(f"run-{os.getpid()}-")}


def in_group(pid: int, group: cgroups.RunCgroup) -> bool:
    text = Path(f"/proc/{pid}/cgroup").read_text()
    return all(f"/{d.name}\n" in text for d in group.dirs.values())


def test_a_child_joins_through_tasks_as_a_whole_process():
    """The preexec's write of 0 to ``tasks`` puts the child (single-threaded after fork) in every controller's
    group, and its own children are born there; the limits apply (pids)."""
    require_cgroups()
    pool = cgroups.GroupPool(1)
    try:
        group = pool.take(None, 4)
        code = ("import os, subprocess, sys\nkid = subprocess.Popen(['sleep', '5'])\nprint(os.getpid(), kid.pid)\n"
                "sys.stdout.flush()\ntry:\n    [subprocess.Popen(['sleep', '5']) for _ in range(5)]\n"
                "except OSError as e:\n    print('refused', e.errno)\n")
        proc = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True,
                                preexec_fn=cgroups.child_setup({}, group))
        first = proc.stdout.readline().split()
        assert all(in_group(int(pid), group) for pid in first)
        assert set(map(int, first)) <= set(group.pids())
        assert proc.stdout.readline().startswith("refused 11")  # EAGAIN: pids.max
        proc.wait()
        group.kill_all()
        assert group.pids() == []
        pool.give_back(group)
    finally:
        pool.close()
    assert my_groups() == set()


def test_groups_are_made_ahead_and_never_serve_twice():
    require_cgroups()
    pool = cgroups.GroupPool(2)
    try:
        ready(pool)
        seen = set()
        for _ in range(6):
            group = pool.take(64_000, 10)
            assert group.pids() == [] and group.peak_memory_kb() is not None
            assert (group.dirs["pids" if group.kind == "cgroup-v1" else ""] / "pids.max").read_text().strip() == "10"
            name = next(iter(group.dirs.values())).name
            assert name not in seen
            seen.add(name)
            pool.give_back(group)
        deadline = time.monotonic() + 10
        while my_groups() & seen:  # used ones are deleted by the pool's thread
            assert time.monotonic() < deadline, my_groups() & seen
            time.sleep(0.02)
    finally:
        pool.close()
    assert my_groups() == set()


def test_every_run_starts_from_zero(runner):
    """A run after a big one reports its own peak memory and CPU time, not the previous run's."""
    ready(runner.groups)
    big = runner.run(71, "x = bytearray(200 << 20)\nimport time\nt = time.process_time()\n"
                         "while time.process_time() - t < 0.6: pass", limits=Limits(memory_limit=512_000))
    assert big.outcome == "exited" and big.exit_code == 0, big
    assert big.memory > 200_000 and big.time >= 0.6
    small = runner.run(71, "print(1)")
    assert small.stdout == b"1\n"
    assert small.memory < 100_000 and small.time < 0.5, small


def test_an_oom_kill_is_reported_for_its_own_run_only(runner):
    oom = runner.run(71, "x = bytearray(300 << 20)", limits=Limits(memory_limit=64_000))
    assert oom.message == "memory limit exceeded" and oom.exit_signal == 9, oom
    nxt = runner.run(71, "print('fine')", limits=Limits(memory_limit=64_000))
    assert (nxt.outcome, nxt.exit_code, nxt.stdout, nxt.message) == ("exited", 0, b"fine\n", None), nxt


def test_limits_of_each_run_apply(runner):
    """The group's caps and the rlimits are the run's own, set when it starts (a group made ahead has none)."""
    ready(runner.groups)
    code = ("import resource\nprint(resource.getrlimit(resource.RLIMIT_FSIZE), resource.getrlimit(resource.RLIMIT_CPU),"
            " resource.getrlimit(resource.RLIMIT_STACK))")
    limits = Limits(max_file_size=100, cpu_time_limit=3, cpu_extra_time=0.5, stack_limit=8000)
    r = runner.run(71, code, limits=limits)
    assert r.stdout.decode().strip() == f"{(102400, 102400)} {(4, 5)} {(8192000, 8192000)}", r
    fork_bomb = ("import os, time\nn = 0\ntry:\n    for _ in range(50):\n        if os.fork() == 0:\n"
                 "            time.sleep(5)\n            os._exit(0)\n        n += 1\nexcept OSError as e:\n"
                 "    print('stopped', n, e.errno)\n")
    r = runner.run(71, fork_bomb, limits=Limits(max_processes_and_or_threads=8))
    assert r.stdout.decode().startswith("stopped "), r
    assert int(r.stdout.split()[1]) < 8
    r = runner.run(71, "x = bytearray(100 << 20)", limits=Limits(memory_limit=50_000))
    assert r.message == "memory limit exceeded", r


def test_nothing_of_a_run_survives_it(runner):
    """A program that leaves a detached child behind: after the run no process runs as the slot's uid, no
    child of the runner lives, and the run's group is deleted."""
    ready(runner.groups)
    before = my_groups()
    kids = {c.pid for c in psutil.Process().children(recursive=True)}  # other tests' kernels, if any
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')"
    r = runner.run(71, code)
    assert r.stdout == b"parent done\n"
    if runner.uid is not None:
        assert not [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == runner.uid]
    assert not [c for c in psutil.Process().children(recursive=True)
                if c.pid not in kids and c.status() != psutil.STATUS_ZOMBIE]
    deadline = time.monotonic() + 10
    while (my_groups() - before) - {next(iter(g.dirs.values())).name for g in list(runner.groups._ready)}:
        assert time.monotonic() < deadline, my_groups()
        time.sleep(0.02)


def test_a_timed_out_run_is_killed_and_the_next_one_is_clean(runner):
    r = runner.run(71, "while True: pass", limits=Limits(cpu_time_limit=0.3, cpu_extra_time=0.1, wall_time_limit=5))
    assert r.outcome == "time_limit", r
    nxt = runner.run(71, "print('next')")
    assert nxt.stdout == b"next\n" and nxt.time < 0.5, nxt


def test_switching_cgroups_off_gives_rlimits_even_with_groups_ready(runner, monkeypatch):
    ready(runner.groups)
    monkeypatch.setenv("RUNFLARE_CGROUPS", "off")
    cgroups._detect.cache_clear()
    try:
        assert runner.groups.take(64_000, 10) is None
        r = runner.run(71, "x = bytearray(100 << 20)", limits=Limits(memory_limit=50_000))
        assert b"MemoryError" in r.stderr, r  # RLIMIT_AS: the allocation fails instead of an OOM kill
    finally:
        monkeypatch.undo()
        cgroups._detect.cache_clear()


def test_close_leaves_no_group_and_no_thread():
    require_cgroups()
    r = Runner(subreaper=True)
    assert is_subreaper()
    ready(r.groups)
    assert r.run(71, "print(1)").stdout == b"1\n"
    r.close()
    if r.lease:
        r.lease.release()
    assert my_groups() == set()
    assert not [t for t in threading.enumerate() if t.name == "runflare-cgroups"]
    assert not is_subreaper()  # orphans of later tests in this process go to init again, not to a zombie here


def is_subreaper() -> bool:
    flag = ctypes.c_int(0)
    assert ctypes.CDLL(None, use_errno=True).prctl(37, ctypes.byref(flag), 0, 0, 0) == 0  # PR_GET_CHILD_SUBREAPER
    return bool(flag.value)


def test_the_preexec_path_still_applies_every_limit(runner):
    """Where the exec prefix cannot be used (not root), the preexec_fn joins the group and sets rlimits."""
    runner.exec_setup = False
    code = "import resource\nprint(resource.getrlimit(resource.RLIMIT_FSIZE))"
    r = runner.run(71, code, limits=Limits(max_file_size=100))
    assert r.stdout.decode().strip() == str((102400, 102400)), r
    r = runner.run(71, "x = bytearray(100 << 20)", limits=Limits(memory_limit=50_000))
    assert r.message == "memory limit exceeded", r


def test_a_group_that_cannot_be_joined_is_an_internal_error_and_runs_nothing(runner, monkeypatch):
    if not runner.exec_setup:
        skip_or_fail("the exec prefix needs root, /bin/sh and prlimit")
    gone = cgroups.RunCgroup.create(f"run-{os.getpid()}-gone", None, None)
    gone.remove()
    monkeypatch.setattr(runner.groups, "take", lambda memory_kb, max_pids: gone)
    r = runner.run(71, "open('/box/ran', 'w').write('x')\nprint('ran')")
    assert r.outcome == "internal" and "cannot join cgroup" in r.message and r.stdout == b"", r


def test_threads_detecting_the_hierarchy_at_once_all_find_it():
    """Each detection probes with a directory of its own: two threads (a runner's launcher and its caller)
    detecting together once made one see the other's probe vanish and fall back to rlimits."""
    require_cgroups()
    found: list[str] = []
    threads = [threading.Thread(target=lambda: found.append(cgroups._detect.__wrapped__()[0])) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert found == [cgroups.mechanism()] * 8 and "rlimit" not in found


def test_a_control_file_is_read_whole_and_a_missing_one_is_none(tmp_path):
    """``_read`` (plain reads of the descriptor): all of a file longer than one read, text as written;
    None for a file that is not there (a group already removed)."""
    text = "".join(f"{pid}\n" for pid in range(20_000))  # about 110 KiB: more than one read
    (tmp_path / "cgroup.procs").write_text(text)
    assert cgroups._read(tmp_path / "cgroup.procs") == text
    assert cgroups._read(tmp_path / "gone") is None
