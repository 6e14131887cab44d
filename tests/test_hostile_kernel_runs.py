"""Hostile programs in kernel runs: each ends with the right outcome, leaves nothing behind,
and the next run is unaffected. Kernels start cold here, so any process left after a run is a leak."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import own_descendants, skip_or_fail, wait_until

from runflare_server.engine.interface import Limits, RunRequest, RunResult
from runflare_server.engine.jupyter.kernel_pool import installed_kernelspecs
from runflare_server.engine.runs.kernel_runs import KernelRuns, install_kernelspecs

pytestmark = pytest.mark.timeout(120)
SECRET_ENV = "RUNFLARE_TEST_SECRET"
PROJECT = Path(__file__).resolve().parents[1]
FAST = Limits(cpu_time_limit=1.0, cpu_extra_time=0.5, wall_time_limit=3.0)


class Engine:
    """A started KernelRuns (no warm pool, and none grown from the demand) on its own event loop."""

    def __init__(self, runtime_dir: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.engine = KernelRuns(pool_sizes={}, runtime_dir=runtime_dir, pool_max=0)
        self.loop.run_until_complete(self.engine.start())

    def run(self, code: str, language_id: int = 1071, **kw) -> RunResult:
        request = RunRequest(token="h", source_code=code, language_id=language_id, **kw)
        return self.loop.run_until_complete(self.engine.run(request, lambda e: None))

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.stop())
        self.loop.close()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    with pytest.MonkeyPatch.context() as mp:  # undone however the module ends
        if "bash" not in installed_kernelspecs():  # into a temp prefix, never this interpreter's
            prefix = tmp_path_factory.mktemp("kernelspecs")
            install_kernelspecs(prefix=str(prefix))
            mp.setenv("JUPYTER_PATH", os.pathsep.join(
                filter(None, [str(prefix / "share" / "jupyter"), os.environ.get("JUPYTER_PATH")])))
        mp.setenv(SECRET_ENV, "s3cr3t-env")
        e = Engine(tmp_path_factory.mktemp("rt"))
        try:
            yield e
        finally:
            e.close()


def leftovers(engine: Engine) -> list[str]:
    """Processes this test process started that are still around (zombies reaped by now), except the
    engine's long-lived fork server: its two bwrap processes and the zygote below them (the kernels it
    forks are one level further down, and count)."""
    fs = engine.engine.fork_server
    top = fs.proc.pid if fs is not None and fs.proc is not None else -1
    server: set[int] = set()
    if top > 0:
        inner = psutil.Process(top).children()
        server = {top, *(p.pid for p in inner), *(c.pid for p in inner for c in p.children())}
    procs = [p for p in own_descendants() if p.pid not in server]
    gone, alive = psutil.wait_procs(procs, timeout=3)
    return [" ".join(p.cmdline()[:3])[:200] for p in alive if p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture
def check(engine: Engine) -> Iterator[Engine]:
    """After the hostile run: nothing left running, and a plain run still works."""
    yield engine
    assert leftovers(engine) == []
    after = engine.run("print('still fine')")
    assert after.stdout == "still fine\n" and after.exit_code == 0


def test_infinite_loop_hits_cpu_limit(check: Engine) -> None:
    result = check.run("while True:\n    pass", limits=FAST)
    assert result.outcome == "time_limit"
    assert result.time is not None and result.time >= FAST.cpu_time_limit


def test_sleep_past_wall_limit(check: Engine) -> None:
    result = check.run("import time\nprint('zz', flush=True)\ntime.sleep(60)", limits=FAST)
    assert result.outcome == "time_limit" and result.stdout == "zz\n"
    assert result.wall_time is not None and result.wall_time >= FAST.wall_time_limit


def test_fork_bomb_is_contained(check: Engine) -> None:
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = check.run(code, limits=Limits(cpu_time_limit=1.0, cpu_extra_time=0.5, wall_time_limit=3.0,
                                           max_processes_and_or_threads=20))
    assert result.outcome == "time_limit"


def test_process_limit_refuses_forks(check: Engine) -> None:
    code = ("import subprocess\nps = []\ntry:\n    for i in range(50):\n"
            "        ps.append(subprocess.Popen(['sleep', '30']))\nexcept OSError as e:\n"
            "    print('refused after', len(ps), type(e).__name__)\n")
    result = check.run(code, limits=Limits(max_processes_and_or_threads=5))
    assert result.stdout.startswith("refused after ") and int(result.stdout.split()[2]) <= 5


def test_memory_balloon_is_killed(check: Engine) -> None:
    result = check.run("x = b'x' * (400 * 1024 * 1024)\nprint('survived')", limits=Limits(memory_limit=64_000))
    assert result.outcome == "exited"
    assert result.exit_signal == 9 and result.message == "memory limit exceeded"
    assert "survived" not in result.stdout


def test_hundred_megabytes_of_output_is_cut(check: Engine) -> None:
    code = "import sys\nchunk = 'y' * (1 << 20)\nfor i in range(100):\n    sys.stdout.write(chunk)\n"
    result = check.run(code, limits=Limits(max_output_bytes=1 << 20))
    assert len(result.stdout.encode()) <= 1 << 20
    assert len(result.stdout) > 0 and set(result.stdout) == {"y"}
    assert "output truncated" in (result.message or "")


def test_huge_file_is_refused(check: Engine) -> None:
    code = ("try:\n    with open('big.bin', 'wb') as f:\n        f.write(b'z' * (20 << 20))\n"
            "except OSError as e:\n    print('refused', e.errno)\nimport os\nprint(os.path.getsize('big.bin'))")
    result = check.run(code, limits=Limits(max_file_size=1024))
    assert result.stdout.startswith("refused 27\n")  # EFBIG
    assert int(result.stdout.split()[-1]) <= 1024 * 1024


@pytest.fixture
def host_loopback() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A TCP listener and a UDP socket on the host's loopback: the sandbox must never reach either. No other
    target is needed: a namespace whose only interface is lo has no route to anywhere else."""
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    yield tcp, udp
    tcp.close()
    udp.close()


def reached(sock: socket.socket) -> bool:
    """Whether anything arrived: a connection that completed its handshake stays queued even once closed."""
    sock.setblocking(False)
    try:
        if sock.type == socket.SOCK_STREAM:
            sock.accept()[0].close()
        else:
            sock.recv(64)
    except BlockingIOError:
        return False
    return True


def test_no_network_local_or_public(check: Engine, host_loopback: tuple[socket.socket, socket.socket]) -> None:
    tcp, udp = host_loopback
    code = (
        "import errno, socket\n"
        "print('interfaces', sorted(name for _, name in socket.if_nameindex()))\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {tcp.getsockname()[1]}), timeout=2).close()\n"
        "    print('tcp connected')\n"
        "except OSError as e:\n"
        "    print('tcp', errno.errorcode[e.errno])\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "try:\n"
        f"    s.sendto(b'x', ('127.0.0.1', {udp.getsockname()[1]})); print('udp sent')\n"
        "except OSError as e:\n"
        "    print('udp', errno.errorcode[e.errno])\n"
    )
    result = check.run(code)
    # the kernel's namespace has only a loopback, and it is down: nothing is routable, not even its own
    assert result.stdout == "interfaces ['lo']\ntcp ENETUNREACH\nudp ENETUNREACH\n", result
    assert not reached(tcp) and not reached(udp)


def test_server_files_and_environment_invisible(check: Engine, tmp_path: Path) -> None:
    secret = tmp_path / "data" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("top secret")
    runtime = check.engine.runtime_dir
    code = (
        "import os\n"
        # the project's own files (the interpreter's tree, a venv inside the clone, is bound read-only)
        f"for p in [{str(secret)!r}, {str(runtime)!r}, '/root/.bash_history', {str(PROJECT / 'pyproject.toml')!r}]:\n"
        "    print(p.split('/')[-1], os.path.exists(p))\n"
        f"print({SECRET_ENV!r} in os.environ)\n"
        "try:\n    open('/etc/evil', 'w')\nexcept OSError as e:\n    print('ro', e.errno)\n"
        "try:\n    open('/usr/evil', 'w')\nexcept OSError as e:\n    print('ro', e.errno)\n"
        "import json, stat\n"
        "names = sorted(os.listdir('/run/kernel'))\n"
        "print(json.dumps({'names': names, 'sockets': [n for n in names if stat.S_ISSOCK(os.lstat('/run/kernel/' + n).st_mode)],\n"
        "                  'conn': json.load(open('/run/kernel/connection.json')),\n"
        "                  'kernels': os.listdir('/run/kernels') if os.path.isdir('/run/kernels') else None}))\n"
    )
    result = check.run(code)
    lines = result.stdout.splitlines()
    assert lines[:4] == ["secret.txt False", f"{runtime.name} False", ".bash_history False", "pyproject.toml False"]
    assert lines[4] == "False"
    assert lines[5:7] == ["ro 30", "ro 30"]  # EROFS
    # /run/kernel is this kernel's own connection dir: its connection file, naming ipc sockets in that dir,
    # and a socket for each of its channels; nothing of another kernel (their dirs are k-<12 hex>) or of
    # the fork server (status-<id> files), and the dir holding the other kernels' dirs is hidden (empty).
    seen = json.loads(lines[7])
    conn = seen["conn"]
    assert (conn["transport"], conn["ip"]) == ("ipc", "/run/kernel/k")
    channels = [f"k-{conn[c + '_port']}" for c in ("shell", "iopub", "stdin", "control")]
    assert "connection.json" in seen["names"] and set(channels) <= set(seen["sockets"]), seen
    assert not [n for n in seen["names"] if re.fullmatch(r"k-[0-9a-f]{12}|status-.*", n)], seen
    assert seen["kernels"] in (None, []), seen
    assert len(lines) == 8


def test_killing_its_parent_and_everything(check: Engine) -> None:
    code = ("import errno, os, signal\n"
            "for pid in (os.getppid(), 1):\n"
            "    try:\n        os.kill(pid, signal.SIGKILL)\n"
            "    except OSError as e:\n        print('kill', pid == 1 and 'init' or 'parent', errno.errorcode[e.errno])\n"
            "print('parent survives', flush=True)\nos.kill(-1, signal.SIGKILL)\nprint('unreachable')")
    result = check.run(code)
    assert result.outcome == "exited"
    # the namespace's init is not the kernel's uid: it cannot be signalled at all (identity layer)
    assert result.stdout.count("kill init EPERM") == 2, result  # its parent is that init
    assert "parent survives" in result.stdout and "unreachable" not in result.stdout
    assert result.exit_signal == 9 or (result.exit_code or 0) != 0


def test_child_outliving_the_run_is_killed(check: Engine) -> None:
    marker = f"{time.time_ns() % 10**9}"
    code = ("import subprocess\n"
            f"subprocess.Popen(['sleep', '3{marker}'], start_new_session=True)\n"
            f"subprocess.Popen(['sh', '-c', '(sleep 4{marker} &) ; exit 0'])\n"
            "print('spawned')")
    result = check.run(code)
    assert result.stdout == "spawned\n" and result.exit_code == 0
    # the sleeps would last for years: their going away at all means the run's end killed them
    wait_until(lambda: not [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])],
               timeout=20)


def test_bash_infinite_loop_and_orphans(check: Engine) -> None:
    if "bash" not in check.engine.kernelspecs():
        skip_or_fail("bash_kernel is not installed (pip install bash_kernel)")
    result = check.run("while :; do :; done", language_id=1046, limits=FAST)
    assert result.outcome == "time_limit"
    marker = f"{time.time_ns() % 10**9}"
    result = check.run(f"nohup sleep 5{marker} >/dev/null 2>&1 &\ndisown\necho bg", language_id=1046)
    assert result.stdout.strip() == "bg" and result.exit_code == 0
    wait_until(lambda: not [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])],
               timeout=20)  # a sleep of years: gone only because it was killed


def test_bash_no_network_and_read_only(check: Engine, host_loopback: tuple[socket.socket, socket.socket]) -> None:
    if "bash" not in check.engine.kernelspecs():
        skip_or_fail("bash_kernel is not installed (pip install bash_kernel)")
    tcp, _ = host_loopback
    code = (f"err=$( (exec 3<>/dev/tcp/127.0.0.1/{tcp.getsockname()[1]}) 2>&1 ) && echo open || echo blocked: ${{err##*: }}\n"
            "echo interfaces $(tail -n +3 /proc/net/dev | cut -d: -f1)\n"
            "touch /usr/x 2>/dev/null && echo wrote || echo ro\n")
    result = check.run(code, language_id=1046)
    assert result.stdout.splitlines() == ["blocked: Connection refused", "interfaces lo", "ro"], result
    assert not reached(tcp)


def test_deno_no_network_and_infinite_loop(check: Engine, host_loopback: tuple[socket.socket, socket.socket]) -> None:
    if "deno" not in check.engine.kernelspecs():
        skip_or_fail("Deno kernelspec is not installed (pip install deno; deno jupyter --install)")
    tcp, _ = host_loopback
    code = ("const dev = Deno.readTextFileSync('/proc/net/dev').split('\\n').slice(2).filter(l => l.includes(':'));\n"
            "console.log('interfaces', dev.map(l => l.split(':')[0].trim()).join(','));\n"
            f"try {{ (await Deno.connect({{hostname: '127.0.0.1', port: {tcp.getsockname()[1]}}})).close(); "
            "console.log('open') }\n"
            "catch (e) { console.log('blocked', e.name) }")
    result = check.run(code, language_id=1063)
    assert result.stdout == "interfaces lo\nblocked ConnectionRefused\n", result  # its own loopback, not the host's
    assert not reached(tcp)
    result = check.run("while (true) {}", language_id=1063, limits=FAST)
    assert result.outcome == "time_limit"


def test_runs_cannot_see_or_leave_anything_for_each_other(check: Engine) -> None:
    first = check.run("import os\nfor d in ['/dev/shm', '/tmp', '/sandbox', '/run/kernel']:\n"
                      "    open(d + '/rf-mark', 'w').write('x')\nprint('ok')")
    assert first.stdout == "ok\n"
    code = ("import os\nprint([os.path.exists(d + '/rf-mark') for d in ['/dev/shm', '/tmp', '/sandbox', '/run/kernel']])\n"
            "print(sorted(p for p in os.listdir('/proc') if p.isdigit()))\n"
            "print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])")
    second = check.run(code)
    # its PID namespace holds its init and itself only: no other kernel (the pool keeps others alive), no
    # process of the fork server or the host
    assert second.stdout.splitlines() == ["[False, False, False, False]", "['1', '2']", "0000000000000000"]


def test_process_limit_holds_in_rlimit_only_mode(tmp_path_factory: pytest.TempPathFactory,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Without cgroups the limit is RLIMIT_NPROC, counted per uid: it holds because each kernel has its own
    unprivileged uid (root would ignore it)."""
    from runflare_server.engine.sandbox import cgroups

    monkeypatch.setenv("RUNFLARE_CGROUPS", "off")
    cgroups._detect.cache_clear()
    e = Engine(tmp_path_factory.mktemp("rt-rlimit"))
    try:
        assert e.engine.health()["cgroups"] == "rlimit"
        code = ("import errno, os, time\nkids = []\nwhile True:\n    try:\n        pid = os.fork()\n"
                "    except OSError as err:\n        print('refused after', len(kids), errno.errorcode[err.errno])\n"
                "        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n    kids.append(pid)\n"
                "for k in kids:\n    os.kill(k, 9)\n")
        # (without cgroups, memory is the sum of RSS: copy-on-write children count in full, so room for it)
        result = e.run(code, limits=Limits(max_processes_and_or_threads=12, memory_limit=512_000, wall_time_limit=10.0))
        words = result.stdout.split()
        assert words[:2] == ["refused", "after"] and words[3] == "EAGAIN", result
        assert int(words[2]) < 12  # the kernel's own threads count too
    finally:
        e.close()
        monkeypatch.undo()
        cgroups._detect.cache_clear()
