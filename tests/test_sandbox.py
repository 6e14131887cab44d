"""The sandbox command, per-run cgroups and the runner, on real processes (no kernel in between)."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from runflare_server.engine.interface import Limits
from runflare_server.engine.sandbox import cgroups, policy, seccomp
from runflare_server.engine.sandbox import process as sandbox
from runflare_server.kernels.runner import Runner

PY = os.path.realpath(sys.executable)
PY_PREFIX = [sys.base_prefix]
PROJECT = str(Path(__file__).resolve().parents[1])

PROBE = f"""
import errno, os, socket, sys, json
out = {{"cwd": os.getcwd(), "env": dict(os.environ), "pids": [p for p in os.listdir("/proc") if p.isdigit()],
       "project": os.path.exists({PROJECT!r}), "host_tmp": os.listdir("/tmp")}}
try:
    open("/usr/pwned", "w")
    out["usr"] = "writable"
except OSError:
    out["usr"] = "read-only"
out["interfaces"] = sorted(name for _, name in socket.if_nameindex())
try:  # a port the test listens on, on the host's loopback
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3).close()
    out["host_loopback"] = "connected"
except OSError as e:
    out["host_loopback"] = errno.errorcode.get(e.errno, str(e.errno))
open("written", "w").write("x")
print(json.dumps(out))
"""


@pytest.fixture
def workdir(tmp_path):
    d = sandbox.new_workdir()  # under runs_root(): traversable by the sandbox uid in every mode
    (d / "probe.py").write_text(PROBE)
    yield d
    sandbox.remove_workdir(d)
    assert not d.exists()


def run_probe(mode: str, workdir: Path, **kw) -> dict:
    import json

    lease = policy.UidLease.acquire()
    os.chown(workdir, lease.uid, lease.uid)
    listener = socket.create_server(("127.0.0.1", 0))
    fd = seccomp.bpf_fd()
    try:
        # unshare mode shows the host's files as they are: the slot uid cannot reach a Python under /root
        py = "/usr/bin/python3" if mode == "unshare" else PY
        port = str(listener.getsockname()[1])
        cmd = sandbox.wrap([py, "probe.py", port], workdir=workdir, mode=mode, env=sandbox.sandbox_env({"MARK": "1"}),
                           ro_paths=PY_PREFIX, uid=lease.uid, seccomp_fd=fd, **kw)
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, env={"PATH": sandbox.DEFAULT_PATH},
                           timeout=60, pass_fds=(fd,))
        listener.setblocking(False)
        try:  # a connection that completed its handshake waits here even if the probe closed it
            listener.accept()[0].close()
            host_accepted = True
        except BlockingIOError:
            host_accepted = False
    finally:
        listener.close()
        os.close(fd)
        lease.release()
    assert r.returncode == 0, r.stderr
    return {**json.loads(r.stdout), "host_accepted": host_accepted}


def test_mode_resolution():
    assert sandbox.resolve_mode("auto") in ("bwrap", "unshare")
    assert sandbox.resolve_mode("none") == "none"
    with pytest.raises(ValueError):
        sandbox.resolve_mode("docker")


def test_bwrap_isolation(workdir, monkeypatch):
    if sandbox.resolve_mode("auto") != "bwrap":
        pytest.skip("bwrap not usable here")
    monkeypatch.setenv("RUNFLARE_TEST_SECRET", "leak")
    out = run_probe("bwrap", workdir)
    monkeypatch.delenv("RUNFLARE_TEST_SECRET")
    assert out["cwd"] == sandbox.BOX
    assert out["env"]["MARK"] == "1" and "RUNFLARE_TEST_SECRET" not in out["env"]
    assert set(out["env"]) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "USER", "MARK", "PWD"}
    assert out["usr"] == "read-only"
    assert out["interfaces"] == ["lo"]  # only a loopback in the namespace: no route anywhere else
    assert out["host_loopback"] == "ECONNREFUSED" and not out["host_accepted"]  # its own loopback, not the host's
    assert out["project"] is False
    assert out["host_tmp"] == []
    assert len(out["pids"]) < 5
    assert (workdir / "written").read_text() == "x"  # the work dir is the writable part


def test_bwrap_network_flag_gives_a_user_mode_network_never_the_hosts(workdir):
    if sandbox.resolve_mode("auto") != "bwrap":
        pytest.skip("bwrap not usable here")
    from runflare_server.engine.sandbox import network

    network.prepare_tun()
    lease = policy.UidLease.acquire()
    os.chown(workdir, lease.uid, lease.uid)

    def run(**kw) -> str:
        fd = seccomp.bpf_fd()
        try:
            cmd = sandbox.wrap(["cat", "/proc/net/dev"], workdir=workdir, mode="bwrap", env=sandbox.sandbox_env(),
                               uid=lease.uid, seccomp_fd=fd, **kw)
            env = policy.launcher_env() if kw.get("network") else None  # root starts the launcher
            return subprocess.run(cmd, capture_output=True, text=True, pass_fds=(fd,), env=env, timeout=60).stdout
        finally:
            os.close(fd)

    try:
        isolated, networked = run(), run(network=True)
    finally:
        lease.release()
    interfaces = [line.split(":")[0].strip() for line in networked.splitlines()[2:]]
    assert [line.split(":")[0].strip() for line in isolated.splitlines()[2:]] == ["lo"]
    assert "lo" in interfaces and len(interfaces) == 2  # pasta's own tap device, not the host's interfaces
    assert networked != Path("/proc/net/dev").read_text()


def test_network_sandbox_is_never_started_by_root(workdir):
    with pytest.raises(ValueError, match="slot uid"):
        policy.bwrap_command(["true"], uid=None, binds=[], env={}, network=True, chdir="/", seccomp_fd=3)


def test_unshare_fallback(workdir):
    if not sandbox._works("unshare"):
        pytest.skip("unshare cannot create namespaces here")
    out = run_probe("unshare", workdir)
    assert out["interfaces"] == ["lo"]
    assert out["host_loopback"] == "ENETUNREACH" and not out["host_accepted"]  # its own loopback, still down
    assert set(out["env"]) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "USER", "MARK", "PWD"}
    assert len(out["pids"]) < 5


def test_cgroup_memory_limit_and_accounting():
    mech = cgroups.mechanism()
    assert mech in ("cgroup-v1", "cgroup-v2", "rlimit")
    if mech == "rlimit":
        pytest.skip("no writable cgroup hierarchy here")
    group = cgroups.RunCgroup.create("test-balloon", memory_kb=64_000, max_pids=10)
    assert group is not None
    with group:
        proc = subprocess.Popen([PY, "-c", "x = bytearray(400 << 20)"], preexec_fn=cgroups.rlimit_preexec(Limits(), group))
        assert proc.wait() == -9
        assert group.oom_killed()
        assert 0 < group.peak_memory_kb() <= 64_000
        assert group.cpu_seconds() is None or group.cpu_seconds() > 0
    assert all(not d.exists() for d in group.dirs.values())


def test_cgroup_pids_limit_and_kill_all():
    if cgroups.mechanism() == "rlimit":
        pytest.skip("no writable cgroup hierarchy here")
    with cgroups.RunCgroup.create("test-pids", memory_kb=None, max_pids=5) as group:
        proc = subprocess.Popen(["bash", "-c", "for i in 1 2 3 4 5 6 7 8; do sleep 100 & done; wait"],
                                preexec_fn=cgroups.rlimit_preexec(Limits(), group), stderr=subprocess.DEVNULL)
        for _ in range(100):
            if len(group.pids()) >= 5:
                break
            subprocess.run(["sleep", "0.05"])
        assert len(group.pids()) == 5  # the sixth fork fails
        group.kill_all()
        assert group.pids() == []
        proc.wait()


def test_rlimits_in_child():
    limits = Limits(max_file_size=100, cpu_time_limit=2, cpu_extra_time=1, stack_limit=8000)
    code = "import resource as r; print(r.getrlimit(r.RLIMIT_FSIZE), r.getrlimit(r.RLIMIT_CPU), r.getrlimit(r.RLIMIT_STACK))"
    out = subprocess.run([PY, "-c", code], preexec_fn=cgroups.rlimit_preexec(limits), capture_output=True, text=True).stdout
    assert out.strip() == f"{(102400, 102400)} {(3, 4)} {(8192000, 8192000)}"
    values = cgroups.rlimit_values(limits, use_cgroup=False)
    assert values[resource.RLIMIT_AS] == (limits.memory_limit * 1024,) * 2
    assert resource.RLIMIT_AS not in cgroups.rlimit_values(limits, use_cgroup=True)


def test_runner_cleans_up_and_measures(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNFLARE_RUNS_DIR", str(tmp_path))
    result = Runner().run(71, "import sys\nprint(sys.stdin.read().upper())", stdin=b"abc")
    assert (result.outcome, result.exit_code, result.stdout) == ("exited", 0, b"ABC\n")
    assert result.time > 0 and result.wall_time > 0 and result.memory > 0
    assert list(tmp_path.iterdir()) == []


def test_runner_in_unshare_mode(tmp_path, monkeypatch):
    if not sandbox._works("unshare"):
        pytest.skip("unshare cannot create namespaces here")
    result = Runner("unshare").run(71, "import os\nprint(os.getpid(), sorted(os.environ)[:1])")
    assert result.outcome == "exited" and result.exit_code == 0, result
    assert int(result.stdout.split()[0]) < 5


def test_runner_none_mode_is_explicit(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RUNFLARE_RUNS_DIR", str(tmp_path))
    result = Runner("none").run(71, "print('unsandboxed')")
    assert result.stdout == b"unsandboxed\n"
    assert "SANDBOX DISABLED" in caplog.text


@pytest.fixture
def rlimit_only(monkeypatch):
    monkeypatch.setenv("RUNFLARE_CGROUPS", "off")
    cgroups._detect.cache_clear()
    yield
    monkeypatch.undo()
    cgroups._detect.cache_clear()


def test_rlimit_fallback_limits_and_measures(rlimit_only, tmp_path, monkeypatch):
    assert cgroups.mechanism() == "rlimit"
    assert cgroups.RunCgroup.create("x", 1000, 10) is None
    monkeypatch.setenv("RUNFLARE_RUNS_DIR", str(tmp_path))
    runner = Runner()
    limits = Limits(cpu_time_limit=1, cpu_extra_time=0.5, wall_time_limit=5, memory_limit=64_000)
    ok = runner.run(71, "x = bytearray(30 << 20)\nfor i in range(200000): pass", limits=limits)
    assert (ok.outcome, ok.exit_code) == ("exited", 0), ok
    assert ok.time > 0 and ok.memory > 30_000  # the program's own rusage, reported by its reaper
    balloon = runner.run(71, "x = bytearray(400 << 20)", limits=limits)
    assert balloon.exit_code == 1 and b"MemoryError" in balloon.stderr  # RLIMIT_AS
    spin = runner.run(71, "while True: pass", limits=limits)
    assert spin.outcome == "time_limit"


def test_per_process_memory_flag_uses_rlimit_as(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNFLARE_RUNS_DIR", str(tmp_path))
    limits = Limits(memory_limit=64_000, enable_per_process_and_thread_memory_limit=True)
    result = Runner().run(71, "x = bytearray(200 << 20)", limits=limits)
    assert (result.exit_code, result.exit_signal) == (1, None) and b"MemoryError" in result.stderr


def test_groups_of_dead_creators_are_swept():
    if cgroups.mechanism() == "rlimit":
        pytest.skip("no writable cgroup hierarchy here")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = cgroups.RunCgroup.create(f"run-{dead.pid}-feedbeef", 64_000, 10)
    mine = cgroups.RunCgroup.create(f"run-{os.getpid()}-cafe", 64_000, 10)
    try:
        assert cgroups.sweep_stale() >= 1
        assert not any(d.exists() for d in stale.dirs.values())
        assert all(d.exists() for d in mine.dirs.values())
    finally:
        mine.remove()
