"""Nothing outlives a run: what a SIGKILLed server left on disk is swept when a server starts again.

A real server runs a program run and a kernel run that wait for stdin; it is killed with SIGKILL mid-run. Its
program-run pool dir (where run dirs with the submission's source live, unless the kernel keeps them on a
private tmpfs), the program-run kernels' ipc dir (sockets and connection files) and the kernel-run runtime
dir (connection files) are still there; a new server on the same data dir removes them at start, and
leaves its own dirs and those of live processes alone. No file holding the submission's source remains.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path

import psutil
import pytest
from conftest import start_server, wait_until
from http_client import get, post
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from runflare_server.engine.sandbox import scratch

pytestmark = pytest.mark.timeout(300)

ENV = {"RUNFLARE_KERNEL_POOL": '{"python3": 1}'}


def dirs_of(pid: int) -> dict[str, Path]:
    """The scratch dirs process ``pid`` made, by kind."""
    found: dict[str, Path] = {}
    for base in scratch.default_bases():
        for entry in Path(base).glob(f"runflare-*-{pid}-*"):
            kind = entry.name.split("-")[1]
            assert kind not in found, (kind, found[kind], entry)
            found[kind] = entry
    return found


def files_holding(marker: str) -> list[Path]:
    """Files under any Run-Flare scratch dir (of any server) whose text contains ``marker``."""
    hits = []
    for base in scratch.default_bases():
        for top in Path(base).glob("runflare-*"):
            for f in top.rglob("*"):
                try:
                    if f.is_file() and not f.is_symlink() and f.stat().st_size < 1 << 20 \
                            and marker in f.read_text(errors="replace"):
                        hits.append(f)
                except OSError:
                    continue
    return hits


def status(api: str, token: str) -> int:
    return get(f"{api}/submissions/{token}").json["status"]["id"]


def finish_with_a_line(server, token: str, line: str) -> None:
    """Send a waiting interactive run its line (and EOF) over the WebSocket; return once the server closes the
    socket, which it does when the run is over."""
    url = server.url.replace("http://", "ws://") + f"/api/v1/submissions/{token}/ws"
    with connect(url) as ws:
        ws.send(json.dumps({"type": "stdin", "data": line + "\n", "eof": True}))
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(timeout=60)


def connection_files_naming(ipc_dir: Path) -> list[Path]:
    """Jupyter connection files in the temp dir (jupyter's default place) that point into ``ipc_dir``."""
    hits = []
    for f in Path("/tmp").glob("tmp*.json"):
        try:
            if str(json.loads(f.read_text()).get("ip", "")).startswith(str(ipc_dir)):
                hits.append(f)
        except (OSError, ValueError):
            continue
    return hits


def test_sigkilled_server_leaves_nothing_after_restart(tmp_path) -> None:
    marker = f"leftover-marker-{uuid.uuid4().hex}"
    server = start_server(tmp_path, "--workers", "2", env=ENV)
    first = server.process.pid
    # both runs wait for a line of stdin that the test sends only to the next server: they are certainly
    # mid-run when this one is killed
    waiting = {"interactive": True, "wall_time_limit": 20}
    program = post(f"{server.api}/submissions", {
        "source_code": f"# {marker}\nprint(input())", "language_id": 71, **waiting}).json["token"]
    kernel = post(f"{server.api}/submissions", {
        "source_code": "print(input())", "language_id": 1071, **waiting}).json["token"]
    wait_until(lambda: status(server.api, program) == 2 and status(server.api, kernel) == 2,
               message="both runs started")

    left = dirs_of(first)
    assert {"pool", "ipc", "kernels"} <= set(left), left

    sources = files_holding(marker)  # none when the kernel keeps run dirs on its private tmpfs
    wait_until(lambda: list(left["kernels"].glob("k-*/connection.json")), message="a kernel's connection file")

    children = psutil.Process(first).children(recursive=True)
    os.kill(first, signal.SIGKILL)  # no clean-up of any kind
    server.process.wait()
    # What the killed server left on disk, looked at at once: any server starting on this machine now
    # (other tests) sweeps these too, as it should.
    assert left["pool"].is_dir() and all(p.exists() for p in sources)
    assert list(left["ipc"].glob("*.json")), "program-run kernels' connection files live in the ipc dir"
    assert not connection_files_naming(left["ipc"]), "no connection file in jupyter's default place"
    assert list(left["kernels"].glob("k-*"))
    _, alive = psutil.wait_procs(children, timeout=15)
    for p in alive:  # not this test's subject (processes); do not leave them behind
        p.kill()
    psutil.wait_procs(alive, timeout=10)

    live = scratch.private_dir("test", tmp_path)  # a live creator's dir (this test process)
    again = start_server(tmp_path, "--workers", "2", env=ENV, port=server.port)
    try:
        for kind, path in left.items():
            assert not path.exists(), f"{kind} dir of the killed server still there: {path}"
        assert not any(p.exists() for p in sources)
        assert not [p for p in files_holding(marker) if str(again.process.pid) not in str(p)]
        assert scratch.sweep_stale([tmp_path]) == 0 and live.is_dir()
        mine = dirs_of(again.process.pid)
        assert {"ipc", "kernels"} <= set(mine), mine
        # the re-queued runs complete on the new server, in its own (untouched) dirs
        for token in (program, kernel):
            finish_with_a_line(again, token, "done")
            wait_until(lambda t=token: status(again.api, t) >= 3, message="the re-queued run")
            assert get(f"{again.api}/submissions/{token}").json["stdout"] == "done\n"
        assert all(path.is_dir() for path in dirs_of(again.process.pid).values())
    finally:
        again.stop()
    assert not dirs_of(again.process.pid), "a server stopped cleanly removes its own dirs"


def test_sweep_spares_live_creators_and_reused_pids(tmp_path) -> None:
    mine = scratch.private_dir("unit", tmp_path)
    assert mine.stat().st_mode & 0o777 == 0o700
    pid, start, boot, _ = mine.name.split("-")[2:]
    assert int(pid) == os.getpid()
    # the same pid with another start time is a reused pid: its creator is dead
    reused = tmp_path / f"runflare-unit-{pid}-{int(start) + 1}-{boot}-{'0' * 8}"
    reused.mkdir()
    # a dir from an earlier boot
    old_boot = tmp_path / f"runflare-unit-{pid}-{start}-{'f' * 8 if boot != 'f' * 8 else '0' * 8}-{'1' * 8}"
    old_boot.mkdir()
    # a process that cannot exist (pids stay below pid_max)
    dead_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    dead = tmp_path / f"runflare-unit-{dead_pid}-1-{boot}-{'2' * 8}"
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "source.py").write_text("secret")
    handed = tmp_path / f"runflare-unit-{dead_pid}-1-{boot}-{'4' * 8}"  # handed to a sandbox uid
    handed.mkdir()
    os.chown(handed, 1_900_000_999, 1_900_000_999)  # the tests run as root
    other = tmp_path / "runflare-unrelated"
    other.mkdir()
    link = tmp_path / f"runflare-unit-{dead_pid}-1-{boot}-{'3' * 8}"
    link.symlink_to(other)
    assert scratch.sweep_stale([tmp_path]) == 4
    assert mine.is_dir() and other.is_dir() and link.is_symlink()
    assert not reused.exists() and not old_boot.exists() and not dead.exists() and not handed.exists()
