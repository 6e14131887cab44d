"""Warm pools of sandboxed kernels: fill, hand out once, replace the dead and the hung, leak nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import own_descendants, skip_or_fail, wait_until

from runflare_server.engine.jupyter.adapters import PythonKernel
from runflare_server.engine.jupyter.kernel_pool import (
    ForkServer,
    KernelPool,
    KernelSpecInfo,
    Pool,
    SandboxedKernel,
    load_spec,
)
from runflare_server.engine.sandbox import kernel_sandbox as sb

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def mode() -> str:
    m = sb.detect_mode("auto")
    if m == "unavailable":
        skip_or_fail("no sandbox (bwrap/unshare) on this host")
    return m


@pytest.fixture
def fork_server(mode: str, tmp_path: Path) -> Iterator[ForkServer]:
    """A fork server of its own (root and bwrap only), closed after the test."""
    if mode != "bwrap" or os.geteuid() != 0:
        skip_or_fail("the fork server needs bwrap and root")
    fs = ForkServer(tmp_path)
    yield fs
    fs.close()


def descendants() -> list[psutil.Process]:
    procs = own_descendants()
    _, alive = psutil.wait_procs(procs, timeout=3)
    return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def fake_spec(name: str, code: str) -> KernelSpecInfo:
    return KernelSpecInfo(name, [sys.executable, "-c", code, "{connection_file}"], "python", name, "/nonexistent")


def test_pool_fills_hands_out_once_and_refills(loop: asyncio.AbstractEventLoop, mode: str, tmp_path: Path) -> None:
    pool = KernelPool(load_spec("python3"), 2, mode, tmp_path)

    async def go() -> None:
        await pool.start()
        assert await pool.wait_full(60)
        first = await pool.acquire()
        second = await pool.acquire()
        assert first is not second and first.alive() and second.alive()
        conn = json.loads((first.dir / "connection.json").read_text())
        assert conn["transport"] == "ipc"
        reply = await first.client.kernel_info(reply=True, timeout=10)
        assert reply["content"]["language_info"]["name"] == "python"
        assert isinstance(reply["header"]["date"], str)  # decoded by LeanSession: dates left unparsed
        assert await pool.wait_full(60)  # refilled in the background
        ready_ids = {k.id for k in pool._ready}
        assert first.id not in ready_ids and second.id not in ready_ids
        await first.shutdown()
        await second.shutdown()
        assert not first.dir.exists() and not first.alive()
        health = pool.health()
        assert health["handed_out"] == 2 and health["started"] >= 4 and health["avg_start_wall_s"] > 0
        await pool.stop()

    loop.run_until_complete(go())
    assert descendants() == []
    assert list(tmp_path.iterdir()) == []


def test_dead_kernel_in_pool_is_replaced(loop: asyncio.AbstractEventLoop, mode: str, tmp_path: Path) -> None:
    pool = KernelPool(load_spec("python3"), 1, mode, tmp_path)

    async def go() -> None:
        await pool.start()
        assert await pool.wait_full(60)
        victim = pool._ready[0]
        for p in victim.processes()[1:]:
            with contextlib.suppress(psutil.NoSuchProcess):  # it may die with the one killed before it
                p.kill()
        victim.proc.wait(5)
        kernel = await pool.acquire()
        assert kernel is not victim and kernel.alive()
        assert pool.health()["replaced"] == 1
        await kernel.shutdown()
        await pool.stop()

    loop.run_until_complete(go())
    assert descendants() == []


def test_kernel_hanging_at_start_is_replaced_then_given_up(loop: asyncio.AbstractEventLoop, mode: str,
                                                          tmp_path: Path) -> None:
    pool = KernelPool(fake_spec("hang", "import time; time.sleep(600)"), 0, mode, tmp_path,
                      start_timeout=1.5, retries=2)

    async def go() -> None:
        with pytest.raises(RuntimeError, match="failed to start"):
            await pool.acquire()
        assert pool.health()["failed"] == 2
        await pool.stop()

    loop.run_until_complete(go())
    assert descendants() == []
    assert list(tmp_path.iterdir()) == []


def test_kernel_dying_at_start_reports_why(loop: asyncio.AbstractEventLoop, mode: str, tmp_path: Path) -> None:
    pool = KernelPool(fake_spec("dies", "import sys; print('no such luck'); sys.exit(3)"), 0, mode, tmp_path,
                      retries=1)

    async def go() -> None:
        with pytest.raises(RuntimeError, match="no such luck"):
            await pool.acquire()
        await pool.stop()

    loop.run_until_complete(go())
    assert descendants() == []


def test_a_kernel_whose_warm_up_fails_is_not_handed_out(loop: asyncio.AbstractEventLoop, mode: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # a run relies on what the warm-up cell installs (Python kernels: the run's set-up hook)
    monkeypatch.setattr(PythonKernel, "warmup", lambda self: "raise ValueError('no warm-up here')")
    pool = KernelPool(load_spec("python3"), 0, mode, tmp_path, retries=1)

    async def go() -> None:
        with pytest.raises(RuntimeError, match="warm-up cell failed: ValueError: no warm-up here"):
            await pool.acquire()
        await pool.stop()

    loop.run_until_complete(go())
    assert descendants() == []


def test_cold_pool_starts_concurrent_kernels(loop: asyncio.AbstractEventLoop, mode: str, tmp_path: Path) -> None:
    pool = KernelPool(load_spec("python3"), 0, mode, tmp_path)

    async def go() -> list[SandboxedKernel]:
        kernels = await asyncio.gather(*(pool.acquire() for _ in range(3)))
        assert len({k.id for k in kernels}) == 3 and all(k.alive() for k in kernels)
        assert pool.health()["ready"] == 0
        await asyncio.gather(*(k.shutdown() for k in kernels))
        await pool.stop()
        return kernels

    loop.run_until_complete(go())
    assert descendants() == []


async def until(predicate, timeout: float = 60) -> None:
    """Wait for a state inside the loop (the timeout only bounds a broken run)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not true within {timeout} s"
        await asyncio.sleep(0.02)


class TimedKernel:
    """A stand-in kernel for the pool's sizing policy alone: it takes a known time to start."""

    def __init__(self) -> None:
        self.shut = False

    def alive(self) -> bool:
        return not self.shut

    async def shutdown(self) -> None:
        self.shut = True


def test_pool_grows_with_its_arrival_rate_and_shrinks_when_quiet(loop: asyncio.AbstractEventLoop) -> None:
    made: list[TimedKernel] = []

    async def factory() -> TimedKernel:
        await asyncio.sleep(0.2)
        made.append(TimedKernel())
        return made[-1]

    async def go() -> None:
        pool: Pool[TimedKernel] = Pool("timed", factory, 1, max_size=5, window=1.0)
        await pool.start()
        assert await pool.wait_full(10)
        assert pool.demand.start_seconds >= 0.2
        taken = await asyncio.gather(*(pool.acquire() for _ in range(6)))  # 6 arrivals/s, 0.2 s+ per start
        assert pool.size >= 2 and pool.health()["max_size"] == 5
        await until(lambda: len(pool._ready) == pool.size)  # refilled to the grown target, not to 1
        grown = list(pool._ready)
        await until(lambda: pool.size == 1, timeout=10)  # a quiet window later: back to its floor
        assert len(pool._ready) == 1
        await until(lambda: sum(k.shut for k in grown) == len(grown) - 1)  # the extra ready ones shut down
        assert not any(k.shut for k in taken)  # never a kernel already handed out
        await pool.stop()
        assert all(k.shut for k in made if k not in taken)

    loop.run_until_complete(go())


def test_a_refill_waits_a_moment_while_kernels_remain_ready(loop: asyncio.AbstractEventLoop) -> None:
    async def factory() -> TimedKernel:
        await asyncio.sleep(0.01)
        return TimedKernel()

    async def go() -> None:
        pool = Pool("refill", factory, 2, max_size=2, handed_off=True)  # the caller keeps what it took, as with KernelPool
        await pool.start()
        assert await pool.wait_full(10)
        await pool.acquire()
        assert pool.health()["starting"] == 0 and len(pool._ready) == 1  # the run that took one goes first
        await until(lambda: len(pool._ready) == 2)  # refilled REFILL_DELAY later
        await pool.acquire()
        await pool.acquire()
        assert pool.health()["starting"] >= 1  # none left ready: at once
        await until(lambda: len(pool._ready) == 2)
        await pool.stop()

    loop.run_until_complete(go())


def test_a_reusing_pool_keeps_its_size(loop: asyncio.AbstractEventLoop) -> None:
    async def factory() -> TimedKernel:
        return TimedKernel()

    async def go() -> None:
        pool: Pool[TimedKernel] = Pool("reused", factory, 2, reuse=10, max_size=8, window=1.0)
        assert pool.max_size == 2  # program runs' kernels are a fixed set
        await pool.stop()

    loop.run_until_complete(go())


def test_a_reused_kernels_successor_starts_during_its_last_run(loop: asyncio.AbstractEventLoop) -> None:
    made: list[TimedKernel] = []

    async def factory() -> TimedKernel:
        await asyncio.sleep(0.05)
        made.append(TimedKernel())
        return made[-1]

    async def go() -> None:
        pool: Pool[TimedKernel] = Pool("recycled", factory, 1, reuse=3)
        await pool.start()
        assert await pool.wait_full(10)
        first = made[0]
        for _ in range(2):
            assert await pool.acquire() is first
            await pool.release(first)
        assert await pool.acquire() is first  # its last run
        await until(lambda: len(pool._ready) == 1)  # its successor is ready while that run goes on
        assert len(made) == 2 and not first.shut
        await pool.release(first)
        assert first.shut or first not in pool._uses  # retired
        assert len(pool._ready) == 1 and await pool.acquire() is made[1]  # the next run waits for no start
        await pool.release(made[1])
        assert len(made) == 2  # and nothing more was started
        await pool.stop()

    loop.run_until_complete(go())


def test_a_reused_kernel_serves_past_its_runs_until_its_successor_is_ready(loop: asyncio.AbstractEventLoop) -> None:
    made: list[TimedKernel] = []
    gate = asyncio.Event()

    async def factory() -> TimedKernel:
        if made:  # the successor takes as long as the test says
            await gate.wait()
        made.append(TimedKernel())
        return made[-1]

    async def go() -> None:
        pool: Pool[TimedKernel] = Pool("recycled", factory, 1, reuse=2)
        await pool.start()
        assert await pool.wait_full(10)
        first = made[0]
        for _ in range(4):  # two runs over its count: no run waits for the successor's start
            kernel = await asyncio.wait_for(pool.acquire(), 10)
            assert kernel is first
            await pool.release(kernel)
        assert pool.health()["starting"] == 1 and not first.shut
        gate.set()
        await until(lambda: len(made) == 2)
        await until(lambda: pool._ready and pool._ready[-1] is made[1])
        assert await pool.acquire() is first  # still ready: its last run...
        await pool.release(first)
        await until(lambda: first.shut)  # ...then retired, since its successor is ready
        assert await pool.acquire() is made[1]
        await pool.stop()

    loop.run_until_complete(go())


def test_an_adaptive_pool_of_real_kernels_shuts_down_what_it_no_longer_needs(
        loop: asyncio.AbstractEventLoop, mode: str, tmp_path: Path) -> None:
    pool = KernelPool(load_spec("python3"), 0, mode, tmp_path, max_size=2, window=4.0)  # starts fit in it

    async def go() -> None:
        kernels = await asyncio.gather(*(pool.acquire() for _ in range(3)))
        await asyncio.gather(*(k.shutdown() for k in kernels))
        assert pool.size >= 1  # a cold kernelspec that was just used keeps a kernel warm
        await until(lambda: len(pool._ready) >= 1)
        warm = list(pool._ready)
        await until(lambda: pool.size == 0 and not pool._ready, timeout=30)
        await until(lambda: not pool._closing)
        assert not any(k.alive() for k in warm) and not any(k.dir.exists() for k in warm)
        await pool.stop()

    loop.run_until_complete(go())
    assert descendants() == []


def test_stop_kills_idle_and_starting_kernels(loop: asyncio.AbstractEventLoop, mode: str, tmp_path: Path) -> None:
    # One pool holds an idle (ready) kernel. The other's kernels never get ready (they hang at start) and start
    # one at a time: at the stop one is certainly mid-start, with its process running, and one is waiting
    # for its turn to start.
    warm = KernelPool(load_spec("python3"), 1, mode, tmp_path)
    hung = KernelPool(fake_spec("hang", "import time; time.sleep(600)"), 2, mode, tmp_path,
                      start_timeout=600, starts=asyncio.Semaphore(1))

    def hung_kernel_running() -> bool:
        for p in own_descendants():
            try:
                if "time.sleep(600)" in " ".join(p.cmdline()):
                    return True
            except psutil.Error:
                continue
        return False

    async def go() -> None:
        await warm.start()
        assert await warm.wait_full(60)
        await hung.start()
        deadline = time.monotonic() + 60  # only a bound for a broken run
        while not hung_kernel_running():
            assert time.monotonic() < deadline, "the hanging kernel's process never started"
            await asyncio.sleep(0.05)
        assert warm.health()["ready"] == 1 and hung.health()["ready"] == 0 and hung.health()["starting"] == 2
        await asyncio.gather(warm.stop(), hung.stop())

    loop.run_until_complete(go())
    assert descendants() == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fork", [False, True])
def test_kernels_die_with_the_server(tmp_path: Path, mode: str, fork: bool) -> None:
    script = textwrap.dedent(f"""
        import asyncio, sys
        from pathlib import Path
        from runflare_server.engine.jupyter.kernel_pool import ForkServer, KernelPool, load_spec
        async def main():
            fs = ForkServer(Path({str(tmp_path)!r})) if {fork!r} else None
            pool = KernelPool(load_spec("python3"), 2, {mode!r}, Path({str(tmp_path)!r}), fork_server=fs)
            await pool.start()
            await pool.wait_full(60)
            pids = [p.pid for k in pool._ready for p in k.processes()]
            print(" ".join(map(str, pids)), flush=True)
            await asyncio.sleep(600)
        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) >= 4
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        wait_until(lambda: not any(map(running, pids)), interval=0.1,
                   message="the kernels died with the process that started them")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


async def _printed(kernel: Any, code: str) -> str:
    """What ``code`` prints on a started kernel."""
    msg_id, out = kernel.client.execute(code), ""
    while True:
        msg = await kernel.client.get_iopub_msg(timeout=20)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            out += msg["content"]["text"]
        if msg["msg_type"] == "error":
            raise AssertionError(msg["content"]["evalue"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return out


def test_fork_server_kernels_and_restart(loop: asyncio.AbstractEventLoop, mode: str, tmp_path: Path,
                                         fork_server: ForkServer) -> None:
    fs = fork_server
    pool = KernelPool(load_spec("python3"), 0, mode, tmp_path, fork_server=fs)
    assert pool.fork_server is fs

    async def go() -> None:
        a, b = await asyncio.gather(pool.acquire(), pool.acquire())
        assert a.proc.pid != b.proc.pid and fs.forks == 2
        for k in (a, b):
            k.out = await _printed(k, "import random, os; print(random.random(), os.getpid())")
        assert a.out != b.out and a.out.split()[1] == "2"  # own pid namespace (below its init), reseeded random
        dirs = [k.km.provisioner.kernel_dir for k in (a, b)]
        assert all(d.is_dir() for d in dirs)
        await a.shutdown()
        await b.shutdown()
        assert not any(d.exists() for d in dirs)  # the connection key, the kernel's output: gone with it
        fs.proc.kill()  # a dead fork server is started again on demand
        fs.proc.wait()
        c = await pool.acquire()
        assert c.alive()
        await c.shutdown()
        await pool.stop()
        fs.close()

    loop.run_until_complete(go())
    assert descendants() == []
    assert not list(tmp_path.glob("k-*"))


def test_a_pool_kernel_connects_its_control_channel_only_when_asked(loop: asyncio.AbstractEventLoop, mode: str,
                                                                     tmp_path: Path) -> None:
    """A pool kernel is killed, never asked: its manager makes no control socket (nor the ZMQ context and
    threads behind one) at start, and still connects one when something does ask."""
    pool = KernelPool(load_spec("python3"), 0, mode, tmp_path)

    async def go() -> None:
        kernel = await pool.acquire()
        try:
            km = kernel.km
            assert km._control_socket is None and not km._created_context
            await km.request_shutdown()  # over the control channel
            control = km._control_socket
            assert control is not None
            deadline = time.monotonic() + 20
            while not control.poll(0) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert control.poll(0), "no reply on the control channel"
            # The kernel heard it. Whether it then exits at once is ipykernel's: 7.4 can stall up to 10 s per
            # stream flushing output after its IOPub thread has stopped, which is why a pool kernel is killed.
            _, reply = km.session.recv(control, mode=0)
            assert reply["msg_type"] == "shutdown_reply" and reply["content"]["status"] == "ok"
        finally:
            await kernel.shutdown()
            await pool.stop()

    loop.run_until_complete(go())
    assert descendants() == []


SHELL_PROBE = """import json, os
ip = get_ipython()
print(json.dumps([ip.kernel.shell is ip, ip.parent is ip.kernel, ip.user_ns["get_ipython"]() is ip,
                  ip.config is ip.kernel.config, ip.profile_dir is ip.kernel.profile_dir, ip.profile_dir.location,
                  ip.ipython_dir, ip.home_dir, os.getcwd(), [os.environ.get(k) for k in ("PAGER", "TERM", "HOME")],
                  ip.history_manager.enabled, ip.colors, sorted(ip.config), type(ip.compile).__name__]))"""


def _forked_and_direct(loop: asyncio.AbstractEventLoop, mode: str, tmp_path: Path, fs: ForkServer,
                       check: Callable[[Any, Any], Awaitable[None]]) -> None:
    """``check(forked, direct)`` on a python3 kernel forked from ``fs`` and one started directly; then
    both shut down, their pools stopped, ``fs`` closed, nothing left running."""
    forked_pool = KernelPool(load_spec("python3"), 0, mode, tmp_path, fork_server=fs)
    direct_pool = KernelPool(load_spec("python3"), 0, mode, tmp_path)

    async def go() -> None:
        forked, direct = await forked_pool.acquire(), await direct_pool.acquire()
        try:
            assert forked.fork_server is fs and direct.fork_server is None
            await check(forked, direct)
        finally:
            for k in (forked, direct):
                await k.shutdown()
            await forked_pool.stop()
            await direct_pool.stop()
            fs.close()

    loop.run_until_complete(go())
    assert descendants() == []


def test_a_forked_kernels_shell_is_wired_as_a_directly_started_kernels(loop: asyncio.AbstractEventLoop, mode: str,
                                                                         tmp_path: Path,
                                                                         fork_server: ForkServer) -> None:
    """A forked kernel adopts the shell the fork server built before any fork; it must be indistinguishable
    from the shell a kernel builds for itself: its kernel, config, profile, home and environment its own."""

    async def check(forked: Any, direct: Any) -> None:
        seen = [json.loads(await _printed(k, SHELL_PROBE)) for k in (forked, direct)]
        assert seen[0] == seen[1]
        assert seen[0][:5] == [True] * 5 and seen[0][7] == "/sandbox" and seen[0][9][0] == "cat"
        assert await _printed(forked, "x = 6 * 7\nprint(get_ipython().user_ns['x'])") == "42\n"

    _forked_and_direct(loop, mode, tmp_path, fork_server, check)


APP_PROBE = """import json, os, sys
app = get_ipython().kernel.parent
root = app.ipython_dir
tree = sorted((os.path.relpath(os.path.join(top, name), root), oct(os.lstat(os.path.join(top, name)).st_mode),
               os.lstat(os.path.join(top, name)).st_size, os.lstat(os.path.join(top, name)).st_uid == os.getuid())
              for top, dirs, files in os.walk(root) for name in dirs + files)
print(json.dumps([type(app).__name__, root, app.profile_dir.location, tree, app.config_file_paths,
                  app._loaded_config_files, app.argv, sys.argv[1:], json.dumps(app.config, sort_keys=True, default=repr),
                  sys.excepthook.__qualname__, os.path.isdir(os.path.join(app.profile_dir.location, "startup"))]))"""


def test_a_forked_kernel_takes_the_prepared_app_set_up_as_a_directly_started_kernels(
        loop: asyncio.AbstractEventLoop, mode: str, tmp_path: Path, fork_server: ForkServer) -> None:
    """The fork server runs the IPython part of the app's set-up (command line, profile dir, config files)
    once; a forked kernel launched as it was prepared for takes that app (its log says so) and must be set up
    as a kernel that did it all itself: the same config and files read, the same ~/.ipython tree, its own."""

    async def check(forked: Any, direct: Any) -> None:
        assert "the kernel took the fork server's prepared app" in (forked.dir / "kernel.log").read_text()
        seen = [json.loads(await _printed(k, APP_PROBE)) for k in (forked, direct)]
        assert seen[0] == seen[1]
        assert seen[0][1] == "/sandbox/.ipython" and seen[0][-1] is True
        assert any(path.endswith("README") for path, *_ in seen[0][3])  # what IPython puts in a new profile
        assert all(own for *_, own in seen[0][3])  # made as the kernel's uid
        # the one difference: the pool's client never pings a heartbeat, so the prepared app starts none
        beats = [await _printed(k, "print(get_ipython().kernel.parent.heartbeat is None)") for k in (forked, direct)]
        assert beats == ["True\n", "False\n"]

    _forked_and_direct(loop, mode, tmp_path, fork_server, check)


def _on_a_forked_kernel(loop: asyncio.AbstractEventLoop, mode: str, tmp_path: Path, fs: ForkServer,
                        check: Callable[[Any], Awaitable[None]], spec: KernelSpecInfo | None = None) -> None:
    """``check(kernel)`` on a kernel of ``spec`` (python3) forked from ``fs``; then it is shut down, its pool
    stopped, ``fs`` closed, nothing left running."""
    pool = KernelPool(spec or load_spec("python3"), 0, mode, tmp_path, fork_server=fs)

    async def go() -> None:
        kernel = await pool.acquire()
        try:
            assert kernel.fork_server is fs
            await check(kernel)
        finally:
            await kernel.shutdown()
            await pool.stop()
            fs.close()

    loop.run_until_complete(go())
    assert descendants() == []


def test_a_forked_kernel_launched_otherwise_sets_up_its_own_app(loop: asyncio.AbstractEventLoop, mode: str,
                                                                 tmp_path: Path, fork_server: ForkServer) -> None:
    """A kernelspec with an environment of its own is not what the app was prepared for: its forked kernels
    set up their own app, in that environment."""
    spec = load_spec("python3")
    spec.env = {"RUNFLARE_TEST_SETTING": "on"}

    async def check(kernel: Any) -> None:
        assert "prepared app" not in (kernel.dir / "kernel.log").read_text()
        code = ("import os\napp = get_ipython().kernel.parent\n"
                "print(os.environ['RUNFLARE_TEST_SETTING'], app.profile_dir.location, app.heartbeat is not None)")
        assert await _printed(kernel, code) == "on /sandbox/.ipython/profile_default True\n"

    _on_a_forked_kernel(loop, mode, tmp_path, fork_server, check, spec)


def test_an_interrupt_reaches_a_forked_kernel_not_its_init(loop: asyncio.AbstractEventLoop, mode: str,
                                                           tmp_path: Path, fork_server: ForkServer) -> None:
    async def check(kernel: Any) -> None:
        msg_id = kernel.client.execute("import time; time.sleep(60)")
        while True:  # running: its execute_input is out (ipykernel ignores SIGINT between cells)
            msg = await kernel.client.get_iopub_msg(timeout=20)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_input":
                break
        await asyncio.sleep(0.3)
        await kernel.km.interrupt_kernel()
        reply = (await kernel._shell_reply(msg_id, 20))["content"]
        assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
        reply = (await kernel._shell_reply(kernel.client.execute("x = 1"), 20))["content"]
        assert reply["status"] == "ok" and kernel.alive()  # the namespace's init did not take the SIGINT

    _on_a_forked_kernel(loop, mode, tmp_path, fork_server, check)


def _sleeps(procs: list[psutil.Process]) -> int:
    count = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            count += p.cmdline()[:1] == ["sleep"]
    return count


def _with_sleeps(kernel: SandboxedKernel) -> list[psutil.Process] | None:
    procs = kernel.processes()
    return procs if _sleeps(procs) == 2 else None


def _all_gone(procs: list[psutil.Process]) -> bool:
    return not any(running(p.pid) for p in procs)


def test_killing_a_forked_kernel_now_kills_all_it_started(loop: asyncio.AbstractEventLoop, mode: str,
                                                          tmp_path: Path, fork_server: ForkServer) -> None:
    """``kill_now`` (a run's end) signals only a forked kernel's PID-namespace init; everything the kernel
    started, detached children included, must still die at once, before any ``shutdown``."""
    fs = fork_server
    pool = KernelPool(load_spec("python3"), 0, mode, tmp_path, fork_server=fs)

    async def go() -> None:
        for with_cgroup in (True, False):  # its cgroup's pids, or (no cgroup hierarchy) its tree
            kernel = await pool.acquire()
            try:
                assert kernel.fork_server is fs
                if with_cgroup:
                    kernel.prepare_cgroup()
                await _printed(kernel, "import subprocess\n"
                                       "subprocess.Popen(['sleep', '600'], start_new_session=True)\n"
                                       "subprocess.Popen(['sh', '-c', '(sleep 600 &); exit 0']).wait()")
                procs = wait_until(partial(_with_sleeps, kernel), message="the kernel's two detached sleeps started")
                kernel.kill_now()
                wait_until(partial(_all_gone, procs), message="every process of the kernel died without a shutdown")
            finally:
                await kernel.shutdown()
        await pool.stop()
        fs.close()

    loop.run_until_complete(go())
    assert descendants() == []


def test_broken_fork_server_falls_back_to_direct_starts(loop: asyncio.AbstractEventLoop, mode: str,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a fork server that cannot start here (as on a host without CAP_SYS_ADMIN for bwrap)
    monkeypatch.setattr(sb, "zygote_argv", lambda runtime_dir, env: [sys.executable, "-c", "print('no caps')"])
    fs = ForkServer(tmp_path)
    pool = KernelPool(load_spec("python3"), 0, mode, tmp_path, fork_server=fs, retries=5)

    async def go() -> None:
        kernel = await pool.acquire()
        assert kernel.alive() and kernel.fork_server is None
        assert not fs.usable and fs.forks == 0
        await kernel.shutdown()
        await pool.stop()
        fs.close()

    loop.run_until_complete(go())
    assert descendants() == []


def test_ready_kernels_wait_in_a_cgroup_of_their_own(loop: asyncio.AbstractEventLoop, mode: str,
                                                     tmp_path: Path) -> None:
    """A ready kernel's whole tree is already in its run's cgroup (no run pays for making and joining it);
    the group goes with the kernel."""
    if sb.cgroup_mechanism() == "rlimit":
        skip_or_fail("no writable cgroup hierarchy here")
    pool = KernelPool(load_spec("python3"), 2, mode, tmp_path)

    async def go() -> list[Path]:
        await pool.start()
        try:
            assert await pool.wait_full(60)
            kernels = list(pool._ready)
            groups = [k.cgroup for k in kernels]
            assert all(g is not None for g in groups) and groups[0] is not groups[1]
            for kernel in kernels:
                tree = {p.pid for p in kernel.processes()}
                assert set(kernel.cgroup.pids()) == tree != set()
                assert {p.pid for p in kernel.members()} == tree  # what a run confines, read from the group
            return [d for g in groups for d in g.dirs.values()]
        finally:
            await pool.stop()

    dirs = loop.run_until_complete(go())
    assert dirs and not any(d.exists() for d in dirs)


def test_tree_finds_every_descendant_even_those_forked_by_a_thread() -> None:
    """sb.tree reads each process's children files: a child forked from a non-main thread is listed
    under that thread, a grandchild under its parent; the same set as psutil's whole-host scan."""
    code = textwrap.dedent("""
        import subprocess, sys, threading, time
        subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60"])
        t = threading.Thread(target=lambda: subprocess.Popen(["sleep", "60"]))
        t.start(); t.join()
        print("ready", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        # sh forks its two sleeps on its own time: wait until psutil's whole-host scan sees all four
        wait_until(lambda: len(psutil.Process(proc.pid).children(recursive=True)) == 4)
        expected = {proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))}
        found = sb.tree(proc.pid)
        assert found[0].pid == proc.pid and {p.pid for p in found} == expected and len(expected) == 5
        assert sb.tree(2 ** 22 + 12345) == []  # no such process
    finally:
        for p in reversed(sb.tree(proc.pid)):
            with contextlib.suppress(psutil.Error):
                p.kill()
        proc.wait(10)


def test_a_kernel_whose_iopub_subscribes_after_its_warm_up_is_probed_ready(
        loop: asyncio.AbstractEventLoop, mode: str, tmp_path: Path, fork_server: ForkServer) -> None:
    """The warm-up cell is a kernel's first request, and what a kernel publishes before the pool's iopub
    subscription is through is lost. Here the subscription is made after the warm-up's idle status went out
    and is through (ipykernel welcomes it) before the wait looks at iopub: the warm-up's idle never comes,
    so the wait must end at a kernel_info probe's, not after a silence, and leave nothing on iopub."""
    pool = KernelPool(load_spec("python3"), 0, mode, tmp_path, fork_server=fork_server)

    async def go() -> None:
        kernel = await pool.acquire()
        kernel.client.stop_channels()  # its subscription gone, the next one is new to the kernel (welcomed)
        await asyncio.sleep(0.2)
        kc = kernel.client = kernel.km.client()  # the pool's client anew, subscribed late
        kc.start_channels(iopub=False, stdin=False, hb=False, control=False)
        probes: list[str] = []
        kernel_info, next_msg = kc.kernel_info, kc.next_msg
        subscribed = False

        def probe() -> str:
            probes.append(kernel_info())
            return probes[-1]

        async def reply_then_subscribe(channel: str, timeout: float | None = None) -> dict[str, Any]:
            nonlocal subscribed
            msg = await next_msg(channel, timeout)
            if channel == "shell" and not subscribed:  # the warm-up's reply
                subscribed = True
                await asyncio.sleep(0.3)  # its idle status goes out meanwhile, to no subscriber
                assert kc.iopub_channel is not None  # made now: connected and subscribed
                await asyncio.sleep(0.3)  # the subscription goes through
            return msg

        kc.kernel_info, kc.next_msg = probe, reply_then_subscribe
        try:
            await kernel._wait_ready(time.monotonic() + 60)
            assert probes, "the wait ended without the idle status of a request it sent"
            with pytest.raises(TimeoutError):
                await next_msg("iopub", 0.3)
            assert await _printed(kernel, "print(6 * 7)") == "42\n"
        finally:
            await kernel.shutdown()
            await pool.stop()

    loop.run_until_complete(go())
