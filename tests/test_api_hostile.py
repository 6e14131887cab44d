"""Hostile programs through the whole server: each ends with the right status, the server stays healthy,
the next submission is unaffected and nothing the program started is left running."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
from conftest import wait_until
from http_client import get, post

MARK = "424242"  # argv marker of every process a hostile program starts

HOSTILE = {
    "fork bomb": ("import os, subprocess\nwhile True:\n    try:\n        subprocess.Popen(['sleep', '" + MARK + "'])\n"
                  "    except OSError:\n        pass\n", {"wall_time_limit": 3}, {5, 11, 12}),
    "memory balloon": ("x = []\nwhile True:\n    x.append(bytearray(10 << 20))\n", {"memory_limit": 65536}, {11, 12}),
    "infinite loop": ("while True:\n    pass\n", {"cpu_time_limit": 1, "wall_time_limit": 5}, {5}),
    "sleep past wall": ("import time\ntime.sleep(30)\n", {"wall_time_limit": 1}, {5}),
    "orphan child": ("import subprocess\nsubprocess.Popen(['sh', '-c', 'sleep " + MARK + " &'], start_new_session=True)\n"
                     "print('parent done')\n", {}, {3}),
    "kills its parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(-1, signal.SIGKILL)\n",
                         {}, {3, 5, 11, 12}),
}


def leftovers() -> list[str]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if MARK in cmd and "pytest" not in cmd:
            found.append(cmd)
    return found


@pytest.mark.parametrize("language_id", [71, 1071])
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_is_contained(live_server, name, language_id):
    source, limits, statuses = HOSTILE[name]
    sub = post(f"{live_server.api}/submissions?wait=true&fields=status,message,stdout,stderr",
               {"source_code": source, "language_id": language_id, **limits}).json
    assert sub["status"]["id"] in statuses, sub
    wait_until(lambda: not leftovers(), interval=0.2, message="nothing the program started is left running")
    health = get(f"{live_server.api}/health").json
    assert health["status"] == "ok"
    after = post(f"{live_server.api}/submissions?wait=true", {"source_code": "print('fine')",
                                                              "language_id": language_id}).json
    assert after["status"]["id"] == 3 and after["stdout"] == "fine\n"


@pytest.mark.parametrize("language_id", [71, 1071])
def test_host_secrets_and_server_files_are_hidden(live_server, language_id):
    probe = (f"import os\npaths = ['/etc/shadow', {str(live_server.data_dir / 'runflare.sqlite3')!r}, "
             f"{str(Path(__file__).resolve())!r}]\n"
             "for p in paths:\n"
             "    try:\n        data = open(p, 'rb').read()\n    except OSError:\n        data = b''\n"
             "    print('exposed' if data else 'hidden')\n"
             "print(sorted(k for k in os.environ if k.startswith(('RUNFLARE', 'JPY'))))\n")
    sub = post(f"{live_server.api}/submissions?wait=true", {"source_code": probe, "language_id": language_id}).json
    assert sub["status"]["id"] == 3, sub
    assert sub["stdout"] == "hidden\nhidden\nhidden\n[]\n"


def test_low_process_limit_still_runs_a_program(live_server):
    sub = post(f"{live_server.api}/submissions?wait=true",
               {"source_code": "print('hi')", "language_id": 71, "max_processes_and_or_threads": 1}).json
    assert sub["status"]["id"] == 3 and sub["stdout"] == "hi\n", sub


def test_forged_kernel_exit_status_cannot_stall_the_server(live_server):
    src = ("import os\nfor name in os.listdir('/run/kernel'):\n    pass\n"
           "try:\n    os.remove('/run/kernel/exit_status')\nexcept OSError:\n    pass\n"
           "os.symlink('/dev/ptmx', '/run/kernel/exit_status')\nos._exit(0)\n")
    sub = post(f"{live_server.api}/submissions?wait=true", {"source_code": src, "language_id": 1071}).json
    assert sub["status"]["id"] > 2
    assert get(f"{live_server.api}/health", timeout=10).json["status"] == "ok"
    after = post(f"{live_server.api}/submissions?wait=true", {"source_code": "print(1)", "language_id": 1071},
                 timeout=30).json
    assert after["stdout"] == "1\n"


def test_rich_output_flood_is_cut(live_server):
    src = "from IPython.display import HTML, display\nfor i in range(50):\n    display(HTML('x' * 100_000))\n"
    sub = post(f"{live_server.api}/submissions?wait=true&fields=status,message,outputs",
               {"source_code": src, "language_id": 1071}).json
    assert sub["status"]["id"] == 8 and "output truncated" in sub["message"]
    assert len(sub["outputs"]) < 11


def test_timer_that_keeps_printing_obeys_the_wall_limit(live_server):
    langs = {lang["id"] for lang in get(f"{live_server.api}/languages").json}
    if 1063 not in langs:
        pytest.skip("the Deno kernel is not installed")
    sub = post(f"{live_server.api}/submissions?wait=true",
               {"source_code": "setInterval(() => console.log('.'), 20);", "language_id": 1063,
                "wall_time_limit": 2}, timeout=60).json
    # the cell itself finished at once (notebook semantics); the timer's output no longer holds the run
    assert sub["status"]["id"] in (3, 5) and sub["stdout"].startswith(".")


def test_program_cannot_forge_its_result(live_server):
    forge = ("import os, time\nt = time.process_time()\nwhile time.process_time() - t < 1.5:\n    pass\n"
             "for pid in ('1', str(os.getppid())):\n    try:\n        fds = os.listdir(f'/proc/{pid}/fd')\n"
             "    except OSError:\n        continue\n    for fd in fds:\n        try:\n"
             "            with open(f'/proc/{pid}/fd/{fd}', 'w') as f:\n                f.write('exit 0 0.001 1000\\n')\n"
             "        except OSError:\n            pass\n")
    sub = post(f"{live_server.api}/submissions?wait=true",
               {"source_code": forge, "language_id": 71, "cpu_time_limit": 1,
                "enable_per_process_and_thread_time_limit": True}).json
    assert sub["status"]["id"] == 5, sub


@pytest.mark.parametrize("language_id", [71, 1071])
def test_many_files_are_bounded_by_the_memory_limit(live_server, language_id):
    src = ("import os\nn = 0\ntry:\n    for i in range(200):\n"
           "        with open(f'f{i}', 'wb') as f:\n            f.write(b'x' * 1_000_000)\n        n += 1\n"
           "except OSError as e:\n    print('stopped', type(e).__name__)\nprint(n)\n")
    sub = post(f"{live_server.api}/submissions?wait=true&fields=status,stdout,message",
               {"source_code": src, "language_id": language_id, "memory_limit": 32000}).json
    written = int(sub["stdout"].split()[-1]) if sub["stdout"] and sub["stdout"].split()[-1].isdigit() else 0
    assert written < 200, sub  # 200 MB never lands on the host's disk


@pytest.mark.parametrize(("source", "status", "exit_code", "exit_signal"), [
    ("import os\nos.abort()", 10, None, 6),
    ("import os\nos._exit(139)", 11, 139, None),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\nprint('still alive')", 12, None, 9),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGFPE)", 9, None, 8),
])
@pytest.mark.parametrize("language_id", [71, 1071])
def test_signals_and_exit_codes_are_exact(live_server, language_id, source, status, exit_code, exit_signal):
    sub = post(f"{live_server.api}/submissions?wait=true&fields=status,exit_code,exit_signal,stdout",
               {"source_code": source, "language_id": language_id}).json
    assert (sub["status"]["id"], sub["exit_code"], sub["exit_signal"]) == (status, exit_code, exit_signal), sub
    assert "still alive" not in (sub["stdout"] or "")
