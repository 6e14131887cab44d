"""Hostile programs through the real pool: each ends with the right outcome, leaves nothing behind,
and the next run is unaffected."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import psutil
import pytest
from conftest import between_runs

from runflare_server.engine.interface import Limits, RunRequest
from runflare_server.engine.runs import languages
from runflare_server.engine.runs.program_runs import BlockingProgramRuns
from runflare_server.engine.sandbox import network
from runflare_server.engine.sandbox import process as sandbox

AVAILABLE = {info.id for info in languages.language_infos()}
SECRET = "rf-secret-7f3a9c"
TIGHT = Limits(cpu_time_limit=1.0, cpu_extra_time=0.5, wall_time_limit=3.0, memory_limit=64_000,
               max_processes_and_or_threads=30, max_file_size=1024)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("server-data")
    (data_dir / "secret.txt").write_text(SECRET)
    # Under runs_root() (traversable): with enable_network bwrap itself runs as the slot uid, and a runs dir
    # below pytest's 0700 /tmp/pytest-of-root is out of its reach.
    runs = Path(tempfile.mkdtemp(prefix="rf-hostile-runs-", dir=sandbox.runs_root()))
    try:
        with BlockingProgramRuns(2, runs_dir=str(runs), kernel_env={"RUNFLARE_SECRET": SECRET,
                                                                     "RUNFLARE_DATA_DIR": str(data_dir)}) as pr:
            yield pr, data_dir, runs
    finally:
        shutil.rmtree(runs, ignore_errors=True)


@pytest.fixture
def pool(env):
    pr, _, runs = env
    yield pr
    # After every hostile run: no process under any kernel but its next run's sandbox, waiting; no work
    # dir but those sandboxes' (empty); and the next run is fine.
    for k in pr.engine._all:
        assert between_runs(k.km.provisioner.process.pid) == []
    left = list(runs.iterdir())
    assert len(left) <= len(pr.engine._all) and all(p.is_dir() and not any(p.iterdir()) for p in left), left
    after, _ = pr.run(req("print('next run ok')"))
    assert (after.outcome, after.stdout) == ("exited", "next run ok\n")


def req(source: str, language_id: int = 71, limits: Limits = TIGHT, **kw) -> RunRequest:
    return RunRequest(token="hostile", source_code=source, language_id=language_id, limits=limits, **kw)


def need(lang: int) -> None:
    if lang not in AVAILABLE:
        pytest.skip(f"toolchain for language {lang} not installed")


@pytest.mark.parametrize("lang,src", [
    (71, "while True: pass"),
    (50, "int main(){ for(;;); }"),
    (63, "for(;;){}"),
    (46, "while :; do :; done"),
])
def test_infinite_loop(pool, lang, src):
    need(lang)
    limits = Limits(**{**TIGHT.__dict__, "wall_time_limit": 8.0})
    result, _ = pool.run(req(src, lang, limits))
    assert result.outcome == "time_limit", result
    assert result.time > 0 and result.wall_time > 0


def test_sleeping_past_wall_limit(pool):
    result, _ = pool.run(req("import time\nprint('start', flush=True)\ntime.sleep(60)"))
    assert result.outcome == "time_limit"
    assert result.wall_time >= TIGHT.wall_time_limit
    assert result.time < TIGHT.cpu_time_limit  # it slept: the wall limit, not the CPU limit, ended it
    assert result.stdout == "start\n"


@pytest.mark.parametrize("lang,src", [
    (71, "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"),
    (46, ":(){ :|:& };:"),
    (50, "#include <unistd.h>\nint main(){ for(;;) fork(); }"),
])
def test_fork_bomb(pool, lang, src):
    need(lang)
    result, _ = pool.run(req(src, lang))
    # Contained either way: the pids limit makes forks fail, then a CPU/wall limit or the program's own exit ends it.
    assert result.outcome in ("time_limit", "exited"), result


@pytest.mark.parametrize("lang,src", [
    (71, "x = bytearray(1 << 30)\nprint('allocated')"),
    (50, "#include <stdlib.h>\n#include <string.h>\nint main(){ for(;;){ char *p = malloc(1<<20); if(!p) return 3;"
         " memset(p, 1, 1<<20); } }"),
])
def test_memory_balloon(pool, lang, src):
    need(lang)
    result, _ = pool.run(req(src, lang))
    assert result.outcome == "exited", result
    assert result.exit_signal == 9 or result.exit_code not in (0, None), result
    assert "allocated" not in result.stdout
    assert result.memory > 0


def test_hundred_megabytes_of_output(pool):
    limits = Limits(**{**TIGHT.__dict__, "wall_time_limit": 10.0, "cpu_time_limit": 5.0})
    result, events = pool.run(req("import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(100):\n"
                                  "    sys.stdout.write(chunk)\nprint('done', file=sys.stderr)", limits=limits))
    assert result.outcome == "exited" and result.exit_code == 0, result
    assert len(result.stdout) + len(result.stderr) == limits.max_output_bytes
    assert "output truncated" in result.message
    streamed = sum(len(e["text"]) for e in events if e["kind"] == "stream")
    assert streamed <= limits.max_output_bytes


@pytest.mark.parametrize("lang,src,signal_or_code", [
    (50, '#include <stdio.h>\nint main(){ FILE *f = fopen("big", "w"); char b[4096] = {0};'
         ' for(int i = 0; i < 100000; i++) fwrite(b, 1, sizeof b, f); fclose(f); return 0; }', ("signal", 25)),
    (71, "with open('big', 'wb') as f:\n    f.write(b'0' * (50 << 20))", ("code", 1)),  # Python ignores SIGXFSZ
    (46, "head -c 50000000 /dev/zero > big", ("code", 153)),  # 128 + SIGXFSZ
])
def test_huge_file(pool, lang, src, signal_or_code):
    need(lang)
    result, _ = pool.run(req(src, lang))
    kind, value = signal_or_code
    assert result.outcome == "exited", result
    assert (result.exit_signal if kind == "signal" else result.exit_code) == value, result


@pytest.fixture
def host_listener():
    """A listener on the host's loopback; the sandbox must never reach it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(5)
    yield s
    s.close()


def accepted_nothing(listener: socket.socket) -> bool:
    """True if no connection is waiting: one that completed its handshake stays queued even if closed."""
    listener.setblocking(False)
    try:
        listener.accept()[0].close()
    except BlockingIOError:
        return True
    return False


@pytest.fixture
def tun():
    old = network.prepare_tun()  # what a server allowing enable_network does at start
    yield
    if old is not None:
        os.chmod("/dev/net/tun", old)
        network.available(refresh=True)


CONNECT_HOST = """
import errno, socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=5).close()
    print("127.0.0.1 CONNECTED")
except OSError as e:
    print("127.0.0.1", errno.errorcode.get(e.errno, e.errno))  # a timeout would print None (no errno)
"""


def test_network_is_unreachable(pool, host_listener):
    # No outside address needed: only a loopback exists in the namespace, so there is no route out of it.
    src = ("import socket\nprint('interfaces', sorted(name for _, name in socket.if_nameindex()))\n"
           + CONNECT_HOST.format(port=host_listener.getsockname()[1]))
    result, _ = pool.run(req(src))
    assert result.stdout == ("interfaces ['lo']\n"
                             "127.0.0.1 ECONNREFUSED\n"), result  # its own loopback refuses: no timeout, no connection
    assert accepted_nothing(host_listener)


def test_network_when_enabled_does_not_reach_host_loopback(pool, host_listener, tun):
    limits = Limits(**{**TIGHT.__dict__, "enable_network": True, "wall_time_limit": 10.0})
    result, _ = pool.run(req(CONNECT_HOST.format(port=host_listener.getsockname()[1]), limits=limits))
    # pasta's namespace has a loopback of its own: nothing listens there, and the host's never sees a connection
    assert result.stdout == "127.0.0.1 ECONNREFUSED\n", result
    assert accepted_nothing(host_listener)


def test_server_data_env_and_other_runs_are_invisible(pool, env):
    _, data_dir, runs = env
    src = f"""
import os, glob
print("env", sorted(os.environ))
print("secret-in-env", any({SECRET!r} in v for v in os.environ.values()))
for path in [{str(data_dir / 'secret.txt')!r}, {str(runs)!r}, "/proc/1/environ", "/etc/shadow", {str(__file__)!r}]:
    try:
        data = open(path, "rb").read() if not os.path.isdir(path) else os.listdir(path)
        print(path, "READABLE", {SECRET!r}.encode() in data if isinstance(data, bytes) else data)
    except OSError as e:
        print(path, "hidden", type(e).__name__)
def readable(p):
    try:
        return open(p, "rb").read()
    except OSError:  # e.g. the reaper: not dumpable
        return b""
leak = [p for p in glob.glob("/proc/[0-9]*/environ") if {SECRET!r}.encode() in readable(p)]
print("proc-leak", leak)
"""
    result, _ = pool.run(req(src))
    out = result.stdout
    assert result.exit_code == 0, result
    assert SECRET not in out and "secret-in-env False" in out
    assert "proc-leak []" in out
    for line in out.splitlines()[2:-1]:
        path, verdict, *_ = line.split()
        assert verdict == "hidden" or (path == "/proc/1/environ" and "True" not in line), line


def test_system_is_read_only_and_work_dir_private(pool):
    src = """
import os
for p in ["/usr/pwned", "/etc/pwned", "/bin/pwned"]:
    try:
        open(p, "w").write("x"); print(p, "WRITTEN")
    except OSError as e:
        print(p, "refused")
open("mine.txt", "w").write("ok"); print("cwd", os.getcwd(), sorted(os.listdir(".")))
open("/tmp/t", "w").write("ok"); print("tmp", sorted(os.listdir("/tmp")))
print("pids", sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
"""
    result, _ = pool.run(req(src))
    lines = result.stdout.splitlines()
    assert lines[:3] == ["/usr/pwned refused", "/etc/pwned refused", "/bin/pwned refused"], result
    assert lines[3].startswith("cwd ") and "'mine.txt'" in lines[3] and "'script.py'" in lines[3]
    assert lines[4] == "tmp ['t']"
    assert max(eval(lines[5].removeprefix("pids "))) < 10  # its own PID namespace: a handful of processes


def test_killing_its_parent(pool):
    result, _ = pool.run(req("import os, signal, time\nos.kill(os.getppid(), signal.SIGKILL)\ntime.sleep(30)"))
    assert result.outcome in ("exited", "time_limit"), result
    assert result.outcome == "time_limit" or result.exit_signal == 9


def test_child_outliving_the_run(pool):
    result, _ = pool.run(req("(sleep 1234.5 &) ; nohup sleep 1234.6 >/dev/null 2>&1 & echo started", 46))
    assert (result.outcome, result.stdout) == ("exited", "started\n")
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] and
                 p.info["cmdline"][-1] in ("1234.5", "1234.6")]
    assert [p for p in leftovers if p.status() != psutil.STATUS_ZOMBIE] == []
