"""Sandboxes started ahead of their run (``Runner(ready_next=True)``, as in the Run-Flare kernel).

After each run the runner starts the next run's sandbox for the same language; its reaper waits on a
control pipe for the program, its limits and its stdin. These tests check that such a sandbox gives the
program exactly what a sandbox started on the spot gives (limits, stdin, argv, a clean work dir), that it
starts only once the previous run's processes are gone, and that nothing of it outlives the runner.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import psutil
import pytest
from conftest import skip_or_fail, wait_until

from runflare_server.engine.interface import Limits
from runflare_server.engine.runs import languages
from runflare_server.engine.sandbox import cgroups, policy
from runflare_server.engine.sandbox import process as sandbox
from runflare_server.engine.sandbox.kernel_sandbox import tree
from runflare_server.kernels import reaper_binary
from runflare_server.kernels.runner import Runner

pytestmark = pytest.mark.timeout(180)
QUICK = Limits(cpu_time_limit=5.0, cpu_extra_time=1.0, wall_time_limit=20.0)


@pytest.fixture(params=["compiled reaper", "perl reaper"])
def runner(request):
    if sandbox.resolve_mode("auto") != "bwrap":
        skip_or_fail("bwrap is missing")
    compiled = request.param == "compiled reaper"
    if compiled and reaper_binary.fd() is None:
        skip_or_fail("no C compiler to build the compiled reaper")
    r = Runner(subreaper=True, ready_next=True, compiled_reaper=compiled)
    if not r.ready_next:
        skip_or_fail("no prlimit64 number for this architecture")
    yield r
    r.close()
    if r.lease:
        r.lease.release()


def waiting(r: Runner):
    """The sandbox the runner started for its next run (after its start thread is done)."""
    with r._ready_lock:
        if r._readying is not None:
            r._readying.result()
        return r._ready


def reaper_of(ahead) -> psutil.Process:
    """The sandbox's reaper (compiled or Perl), once bubblewrap has set the sandbox up and exec'd it."""
    names = (reaper_binary.COMM, "perl")
    return wait_until(lambda: next((p for p in tree(ahead.proc.pid) if p.name() in names), None), 20, 0.01,
                      "a reaper waits in the sandbox")


def test_the_next_run_takes_the_sandbox_started_for_it(runner):
    assert runner.run(71, "print(1)", limits=QUICK).stdout == b"1\n"
    ahead = waiting(runner)
    assert ahead is not None and ahead.usable() and ahead.workdir.is_dir()
    reaper = reaper_of(ahead)
    r = runner.run(71, "import os; print(os.getcwd(), sorted(os.listdir('.')))", limits=QUICK)
    assert r.stdout == b"/box ['script.py']\n", r
    assert not ahead.workdir.exists() and not psutil.pid_exists(reaper.pid)
    assert waiting(runner) is not ahead


def test_limits_stdin_and_argv_reach_the_program_exactly(runner):
    runner.run(71, "pass", limits=QUICK)
    assert waiting(runner) is not None
    limits = Limits(cpu_time_limit=2.0, cpu_extra_time=1.0, wall_time_limit=10.0, max_file_size=64,
                    stack_limit=32_000)
    src = ("import os, resource as r, sys\n"
           "print([r.getrlimit(x) for x in (r.RLIMIT_CPU, r.RLIMIT_FSIZE, r.RLIMIT_STACK, r.RLIMIT_CORE)])\n"
           "import stat\n"
           "print(sys.argv[1:], stat.S_ISREG(os.fstat(0).st_mode), sys.stdin.seekable(), repr(sys.stdin.read()))\n"
           "print(sorted(os.listdir('.')))")
    r = runner.run(71, src, limits=limits, stdin="é\nline\0two".encode(), args="a 'b c' 'd\ne' ü")
    lines = r.stdout.decode().splitlines()
    assert r.outcome == "exited" and r.exit_code == 0, r
    assert lines[0] == str([(3, 4), (64 * 1024,) * 2, (32_000 * 1024,) * 2, (0, 0)])
    assert lines[1] == "['a', 'b c', 'd\\ne', 'ü'] True True 'é\\nline\\x00two'"
    assert lines[-1] == "['script.py']"  # the stdin file was unlinked before the program started


def test_a_ready_sandbox_enforces_the_run_s_memory_processes_and_time(runner):
    if cgroups.mechanism() == "rlimit":
        skip_or_fail("no writable cgroup hierarchy here")
    runner.run(71, "pass", limits=QUICK)
    assert waiting(runner) is not None
    oom = runner.run(71, "x = bytearray(200 << 20)\nprint('kept')", limits=Limits(memory_limit=64_000))
    assert oom.message == "memory limit exceeded" and b"kept" not in oom.stdout, oom
    assert waiting(runner) is not None
    bomb = runner.run(71, "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
                          "            time.sleep(30)\n        n += 1\nexcept OSError:\n    print('stopped', n)\n",
                      limits=Limits(max_processes_and_or_threads=8, wall_time_limit=10.0))
    assert bomb.stdout.startswith(b"stopped"), bomb
    assert int(bomb.stdout.split()[1]) <= 8
    assert waiting(runner) is not None
    spin = runner.run(71, "while True: pass", limits=Limits(cpu_time_limit=0.5, cpu_extra_time=0.0, wall_time_limit=10))
    assert spin.outcome == "time_limit" and spin.message == "CPU time limit exceeded", spin


def test_the_next_sandbox_starts_after_the_run_s_processes_are_gone(runner):
    """A program leaving a detached process behind: it is dead before the next sandbox, which runs as
    the same uid, exists (the two never live at once)."""
    src = ("import os, subprocess\n"
           "subprocess.Popen(['sleep', '300'], start_new_session=True, stdout=subprocess.DEVNULL)\n"
           "print(os.getuid())")
    r = runner.run(71, src, limits=QUICK)
    uid = int(r.stdout)
    ahead = waiting(runner)
    reaper_of(ahead)
    mine = {p.pid for p in tree(ahead.proc.pid)}
    same_uid = [p for p in psutil.process_iter(["uids", "name"]) if p.info["uids"] and p.info["uids"].real == uid]
    assert [p.info["name"] for p in same_uid if p.pid not in mine] == []
    assert not any(p.info["name"] == "sleep" for p in same_uid)


def test_another_language_discards_the_ready_sandbox(runner):
    if 46 not in {info.id for info in languages.language_infos()}:
        skip_or_fail("bash is not installed")
    runner.run(71, "pass", limits=QUICK)
    ahead = waiting(runner)
    reaper_of(ahead)
    pids = [p.pid for p in tree(ahead.proc.pid)]
    r = runner.run(46, "echo hi", limits=QUICK)
    assert r.stdout == b"hi\n", r
    assert not ahead.workdir.exists()
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert waiting(runner).key[0] == 46


def test_close_leaves_no_process_group_or_work_dir(runner):
    runner.run(71, "pass", limits=QUICK)
    ahead = waiting(runner)
    reaper_of(ahead)
    pids = [p.pid for p in tree(ahead.proc.pid)]
    assert pids
    group_dirs = list(ahead.cg.dirs.values()) if ahead.cg else []
    runner.close()
    assert not ahead.workdir.exists()
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not [d for d in group_dirs if Path(d).exists()]
    runner.start_next()  # a closed runner starts no more sandboxes ahead
    assert waiting(runner) is None and runner.ready_next is False


def test_a_sandbox_that_died_while_waiting_is_replaced(runner):
    runner.run(71, "pass", limits=QUICK)
    ahead = waiting(runner)
    os.killpg(ahead.proc.pid, 9)
    ahead.proc.wait()
    r = runner.run(71, "print('fresh')", limits=QUICK)
    assert r.stdout == b"fresh\n", r


def test_the_reaper_refuses_to_run_a_program_when_its_stdin_cannot_be_opened(runner):
    """A set-up failure inside the sandbox is an internal error and nothing runs (here: the reaper, as
    the slot uid, cannot open the stdin file)."""
    if not policy.per_slot_uids():
        skip_or_fail("not root: no slot uid to lock out of the work dir")
    runner.run(71, "pass", limits=QUICK)
    ahead = waiting(runner)
    ahead.workdir.chmod(0o000)  # the reaper (the slot uid) can open nothing in it
    try:
        r = runner.run(71, "open('/box/ran', 'w')\nprint('ran')", limits=QUICK, stdin=b"x")
    finally:
        if ahead.workdir.exists():
            ahead.workdir.chmod(0o700)
    assert r.outcome == "internal" and "cannot open the program's stdin" in r.message and r.stdout == b"", r


def test_the_reaper_joins_the_run_s_group_and_keeps_no_join_file(runner):
    """No process is started just to join the run's cgroup: the reaper writes 0 to the join files the runner
    opened for it, so it (and the program it forks) is in the group, bubblewrap and its init are not (they
    are not the program's to count against its process limit), and no process of the sandbox still holds
    those files once the reaper has joined."""
    if cgroups.mechanism() == "rlimit":
        skip_or_fail("no writable cgroup hierarchy here")
    runner.run(71, "pass", limits=QUICK)
    ahead = waiting(runner)
    reaper = reaper_of(ahead)
    assert wait_until(lambda: ahead.cg.pids() == [reaper.pid], 20, 0.01, "the reaper joins its group")
    sandbox_procs = [p.pid for p in tree(ahead.proc.pid) if p.pid != reaper.pid]
    assert ahead.proc.pid in sandbox_procs and not set(sandbox_procs) & set(ahead.cg.pids())
    join = {os.path.realpath(f) for f in ahead.cg.join_files()}

    def held(pid: int) -> set[str]:
        return {os.path.realpath(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")} & join

    wait_until(lambda: not held(reaper.pid), 20, 0.01, "the reaper closes the join files once joined")
    assert not any(held(pid) for pid in sandbox_procs)  # nor does bubblewrap hold them (its init is pid 1 inside)
    limits = Limits(**{**QUICK.__dict__, "max_processes_and_or_threads": 3})
    code = "import os\nkids = []\ntry:\n    for _ in range(5):\n        pid = os.fork()\n        if pid == 0:\n" \
           "            os.read(os.open('/dev/zero', 0), 0); import time; time.sleep(5); os._exit(0)\n" \
           "        kids.append(pid)\nexcept OSError as e:\n    print(len(kids), e.errno)\n" \
           "for k in kids:\n    os.kill(k, 9)\n"
    r = runner.run(71, code, limits=limits)
    assert r.stdout == b"2 11\n", r  # the program and two children: 3 processes; the third fork is EAGAIN


def test_a_join_the_reaper_cannot_make_runs_nothing(runner, monkeypatch):
    """A join file the reaper cannot write (here: opened read-only) fails the launch before the program
    exists: an internal error saying so, nothing run."""
    if cgroups.mechanism() == "rlimit":
        skip_or_fail("no writable cgroup hierarchy here")
    runner.ready_next = False  # no sandbox started ahead with writable join files: the run starts its own
    runner._take_ready(None)
    monkeypatch.setattr(cgroups.RunCgroup, "open_join_files",
                        lambda self: [os.open(f, os.O_RDONLY | os.O_CLOEXEC) for f in self.join_files()])
    r = runner.run(71, "open('/box/ran', 'w')\nprint('ran')", limits=QUICK)
    assert r.outcome == "internal" and "cannot join cgroup" in r.message and r.stdout == b"", r


def test_sandboxes_started_ahead_outlive_the_threads_that_asked_for_them(runner, monkeypatch):
    """bubblewrap's --die-with-parent is PR_SET_PDEATHSIG: it fires when the *thread* that forked bwrap
    exits (under load, a short-lived starter thread killed about one sandbox in ten). Runs made from
    short-lived threads: every sandbox started ahead comes from one thread that is still alive."""
    starters = []
    launch = runner.launch

    def recorded(*args, **kw):
        if kw.get("key") is not None:
            starters.append(threading.current_thread())
        return launch(*args, **kw)

    monkeypatch.setattr(runner, "launch", recorded)
    results = []
    for _ in range(6):
        t = threading.Thread(target=lambda: results.append(runner.run(71, "print('hi')", limits=QUICK)))
        t.start()
        t.join()
        reaper_of(waiting(runner))
        assert waiting(runner).usable()
    assert [(r.stdout, r.exit_code, r.exit_signal) for r in results] == [(b"hi\n", 0, None)] * 6
    assert len(starters) == 6 and len(set(starters)) == 1 and starters[0].is_alive()


def test_a_deferred_runner_starts_the_next_sandbox_when_told(monkeypatch):
    """The Run-Flare kernel's runner (``defer_next``) starts the next sandbox only once the run's reply is
    out (``start_next``): its set-up does not compete with the reply."""
    if sandbox.resolve_mode("auto") != "bwrap":
        skip_or_fail("bwrap is missing")
    r = Runner(subreaper=True, ready_next=True, defer_next=True)
    try:
        assert r.run(71, "print(2)", limits=QUICK).stdout == b"2\n"
        assert waiting(r) is None
        r.start_next()
        ahead = waiting(r)
        assert ahead is not None and ahead.key[0] == 71
        reaper_of(ahead)
        r.start_next()  # nothing pending: no second sandbox
        assert waiting(r) is ahead
        assert r.run(71, "import os; print(os.listdir('.'))", limits=QUICK).stdout == b"['script.py']\n"
        assert not ahead.workdir.exists()
    finally:
        r.close()
        if r.lease:
            r.lease.release()


def test_the_program_holds_only_its_stdio_and_cannot_reach_its_reaper(runner):
    """The control and status pipes never reach the program (the reaper reads the one and closes it, and
    marks the other close-on-exec); the reaper is not dumpable, so its fds stay closed to the program
    running as the same uid; nothing but the sandbox's init, the reaper and the program is in its view."""
    if not policy.per_slot_uids():
        skip_or_fail("not root: the reaper's dumpable flag is the point, and needs a slot uid")
    src = ("import os\n"
           "print(sorted(int(f) for f in os.listdir('/proc/self/fd')))\n"
           "try:\n    os.listdir(f'/proc/{os.getppid()}/fd')\n    print('reaper fds open')\n"
           "except PermissionError:\n    print('reaper fds closed')\n"
           "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()) == sorted({1, os.getppid(), os.getpid()}))")
    runner.run(71, "pass", limits=QUICK)
    reaper_of(waiting(runner))
    r = runner.run(71, src, limits=QUICK, stdin=b"in")
    assert r.stdout.decode().splitlines() == ["[0, 1, 2, 3]", "reaper fds closed", "True"], r
