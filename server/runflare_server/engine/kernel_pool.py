"""Warm pools of ready, sandboxed Jupyter kernels, one pool per kernelspec.

A kernel is handed out once and never taken back: the caller shuts it down after its run.
Pools refill in the background (a few starts in parallel), replace kernels that die while
waiting or hang at start, and leave nothing behind on stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from . import kernel_sandbox as sb
from . import policy, seccomp
from .adapters import KernelAdapter, adapter_for

log = logging.getLogger(__name__)

@dataclass
class KernelSpecInfo:
    """What is needed to start one kernelspec."""

    name: str
    argv: list[str]
    language: str
    display_name: str
    resource_dir: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def adapter(self) -> KernelAdapter:
        """This kernel family's behaviour (start-up flags, bridge, fork server, set-up cell...)."""
        return adapter_for(self.argv, self.language)


def installed_kernelspecs() -> dict[str, str]:
    """Installed kernelspec names → resource dirs."""
    return KernelSpecManager().find_kernel_specs()


def load_spec(name: str) -> KernelSpecInfo:
    """Read an installed kernelspec; raises KeyError when it is not installed."""
    try:
        spec = KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel as e:
        raise KeyError(name) from e
    argv = sb.resolve_argv(spec.argv)
    argv = [a.replace("{resource_dir}", spec.resource_dir) for a in argv]
    argv += adapter_for(argv, spec.language).lean_args()
    return KernelSpecInfo(name, argv, spec.language, spec.display_name, spec.resource_dir, dict(spec.env or {}))


def _connection(ip: str, key: str) -> dict[str, Any]:
    return {"transport": "ipc", "ip": ip, "shell_port": 1, "iopub_port": 2, "stdin_port": 3,
            "control_port": 4, "hb_port": 5, "key": key, "signature_scheme": "hmac-sha256"}


def read_status_file(path: Path) -> int:
    """The exit status a forked kernel's waiter wrote. The file sits in a dir the sandbox can write, so it
    is opened without following links or blocking, and only a small regular file is believed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return -9
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return -9
        return int(os.read(fd, 16).strip() or -9)
    except (OSError, ValueError):
        return -9
    finally:
        os.close(fd)


class ForkedProcess:
    """A kernel forked by the fork server, seen from the host (a Popen look-alike)."""

    def __init__(self, pid: int, status_file: Path) -> None:
        self.pid = pid
        self.status_file = status_file
        self.returncode: int | None = None  # < 0: killed by that signal (exact, not folded into 128 + n)
        self.exact_status = True

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                gone = psutil.Process(self.pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                gone = True
            if gone:
                self.returncode = read_status_file(self.status_file)
                with contextlib.suppress(OSError):
                    self.status_file.unlink()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)  # noqa: E501
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("kernel", timeout or 0)
            time.sleep(0.005)
        return self.returncode or 0

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


class ForkServer:
    """One sandboxed process with ipykernel imported that forks each new kernel (the program in ``zygote``).

    It lives in a user namespace mapped onto a leased block of ``UIDS`` host uids: the zygote is the block's
    first uid, each kernel it forks gets one of the others for its lifetime (never host root, never shared)."""

    UIDS = 64

    def __init__(self, runtime_dir: Path) -> None:
        self.runtime_dir = runtime_dir
        self.proc: subprocess.Popen | None = None
        self.lease: policy.UidLease | None = None
        self._kernel_uids: dict[int, ForkedProcess] = {}  # uid inside the namespace -> the kernel holding it
        self._lock = asyncio.Lock()
        self.forks = 0
        self.failures = 0  # consecutive kernels that failed to come up; too many → not used any more

    @property
    def usable(self) -> bool:
        """False once it keeps failing here (e.g. no CAP_SYS_ADMIN): pools then start kernels directly."""
        return self.failures < 3

    def note(self, ok: bool) -> None:
        """Record whether a forked kernel came up."""
        self.failures = 0 if ok else self.failures + 1
        if not self.usable:
            log.error("fork server disabled after %d failures; starting kernels directly", self.failures)

    async def _ensure(self) -> subprocess.Popen:
        if self.proc is not None and self.proc.poll() is None:
            return self.proc
        if self.proc is not None:
            self.close()
        if not policy.per_slot_uids():
            raise RuntimeError("the fork server needs root (to map its uid block); kernels start directly")
        env = sb.clean_env({}, sys.executable)
        self.lease = policy.UidLease.acquire(self.UIDS)
        policy.owned_dir(self.runtime_dir, self.lease.first, 0o711)
        # spawned from the event loop thread: bwrap's --die-with-parent follows the spawning thread
        policy.VIEW_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.proc = subprocess.Popen(sb.zygote_argv(self.runtime_dir, env), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=None, start_new_session=True, text=True,
                                     env=policy.launcher_env())
        try:
            line = await self._readline(60)
            if line != "userns":
                raise RuntimeError(f"fork server failed to enter its user namespace: {line!r}")
            self._map_ids()
            self.proc.stdin.write("mapped\n")
            self.proc.stdin.flush()
            line = await self._readline(60)
        except BaseException:
            self.close()
            raise
        if line != "ready":
            self.close()
            raise RuntimeError(f"fork server failed to start: {line!r}")
        return self.proc

    async def _readline(self, timeout: float) -> str:
        loop = asyncio.get_running_loop()
        assert self.proc is not None and self.proc.stdout is not None
        return (await asyncio.wait_for(loop.run_in_executor(None, self.proc.stdout.readline), timeout)).strip()

    def _map_ids(self) -> None:
        """Map the zygote's user namespace onto the leased block (as root, from outside: uid_map lines
        naming other host uids can only be written by a process privileged in the parent namespace)."""
        assert self.proc is not None and self.lease is not None
        pid = self.proc.pid  # the launcher, in its new user namespace, waiting for this map
        line = f"0 {self.lease.first} {self.lease.count}\n"
        for name in ("uid_map", "gid_map"):
            Path(f"/proc/{pid}/{name}").write_text(line)

    def _free_uid(self) -> int | None:
        for uid, kernel in list(self._kernel_uids.items()):
            if kernel.poll() is not None:
                del self._kernel_uids[uid]
        return next((u for u in range(1, self.UIDS) if u not in self._kernel_uids), None)

    async def fork(self, kid: str, kdir: Path) -> ForkedProcess:
        """Fork one kernel for the connection dir ``kdir`` (made its uid's); returns its host-side handle."""
        async with self._lock:
            proc = await self._ensure()
            assert proc.stdin is not None and self.lease is not None
            uid = self._free_uid()
            if uid is None:
                raise RuntimeError(f"all {self.UIDS - 1} fork-server kernel uids are in use")
            host_uid = self.lease.first + uid
            for path in (kdir, *kdir.iterdir()):
                os.chown(path, host_uid, host_uid)
            os.chmod(kdir, 0o700)
            proc.stdin.write(f"{kid} {uid}\n")
            proc.stdin.flush()
            answer = (await self._readline(10)).split()
            if len(answer) != 2 or answer[0] != kid:
                self.close()
                raise RuntimeError(f"fork server answered {answer!r}")
            forked = ForkedProcess(self._host_pid(int(answer[1])), self.runtime_dir / f"status-{kid}")
            self._kernel_uids[uid] = forked
        self.forks += 1
        return forked

    def _host_pid(self, ns_pid: int) -> int:
        for p in sb.tree(self.proc.pid if self.proc else 0):
            try:
                for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                    if line.startswith("NSpid:") and int(line.split()[-1]) == ns_pid and len(line.split()) > 2:
                        return p.pid
            except (OSError, ValueError):
                continue
        raise RuntimeError(f"forked kernel {ns_pid} not found")

    def close(self) -> None:
        """Kill the fork server (kernels it forked die with its namespace) and give its uids back."""
        if self.proc is not None:
            sb.kill_tree(self.proc)
            for f in (self.proc.stdin, self.proc.stdout):
                with contextlib.suppress(Exception):
                    f.close()
            self.proc = None
        self._kernel_uids.clear()
        if self.lease is not None:
            self.lease.release()
            self.lease = None


class SandboxedKernel:
    """One kernel process tree in its own sandbox, with a connected client. Used once."""

    def __init__(self, spec: KernelSpecInfo, mode: str, runtime_dir: Path, network: bool = False,
                 fork_server: ForkServer | None = None) -> None:
        self.spec = spec
        self.fork_server = fork_server
        self.mode = mode
        self.network = network
        self.id = secrets.token_hex(6)
        self.dir = runtime_dir / f"k-{self.id}"
        self.proc: subprocess.Popen | ForkedProcess | None = None
        self.client: AsyncKernelClient | None = None
        self.start_wall: float | None = None
        self.start_cpu: float | None = None
        self.kernel_info: dict[str, Any] = {}
        self.lease: policy.UidLease | None = None  # the kernel's own host uid (bwrap kernels)
        self._closed = False

    def _command(self, seccomp_fd: int) -> tuple[list[str], dict[str, str] | None]:
        conn_inside = sb.SANDBOX_CONN if self.mode in ("bwrap", "unshare") else str(self.dir)
        conn_file = f"{conn_inside}/connection.json"
        if self.spec.adapter.tcp_only:
            tcp_file = f"{conn_inside}/connection-tcp.json"
            argv = sb.bridged([a.replace("{connection_file}", tcp_file) for a in self.spec.argv],
                              conn_file, tcp_file)
        else:
            argv = [a.replace("{connection_file}", conn_file) for a in self.spec.argv]
        env = sb.clean_env(self.spec.env, self.spec.argv[0])
        uid = self.lease.uid if self.lease else None
        if self.network and self.mode == "bwrap" and uid is not None:
            return sb.network_argv(argv, self.dir, env=env, ro_extra=[self.spec.resource_dir], uid=uid,
                                   seccomp_fd=seccomp_fd), policy.launcher_env()
        if self.network and self.mode != "none":
            raise RuntimeError("enable_network for kernel runs needs bwrap and a root server")
        if self.mode == "bwrap":
            return sb.bwrap_argv(argv, self.dir, network=self.network, env=env, ro_extra=[self.spec.resource_dir],
                                 uid=uid, seccomp_fd=seccomp_fd), None
        if self.mode == "unshare":
            return sb.unshare_argv(argv, self.dir, env=env, uid=uid), None
        return argv, {**env, "HOME": str(self.dir / "work"), "IPYTHONDIR": str(self.dir / "work/.ipython")}

    async def start(self, timeout: float) -> None:
        """Start the sandbox and wait until the kernel answers kernel_info. Raises on failure."""
        t0 = time.monotonic()
        self.dir.mkdir(parents=True)
        (self.dir / "work").mkdir()
        key = secrets.token_hex(16)
        inside = sb.SANDBOX_CONN if self.mode in ("bwrap", "unshare") else str(self.dir)
        (self.dir / "connection.json").write_text(json.dumps(_connection(f"{inside}/k", key)))
        if self.fork_server is not None:
            env = sb.clean_env(self.spec.env, self.spec.argv[0])
            argv = [a.replace("{connection_file}", f"{inside}/connection.json") for a in self.spec.argv]
            (self.dir / "launch.json").write_text(json.dumps({"env": env, "argv": ["ipykernel_launcher", *argv[3:]]}))
            self.proc = await self.fork_server.fork(self.id, self.dir)
        else:
            if self.mode != "none" and policy.per_slot_uids():
                self.lease = policy.UidLease.acquire()
                for path in (self.dir, *self.dir.iterdir()):
                    os.chown(path, self.lease.uid, self.lease.uid)
                os.chmod(self.dir, 0o700)
            filter_fd = seccomp.bpf_fd() if self.mode == "bwrap" else -1
            try:
                cmd, env = self._command(filter_fd)
                self.proc = sb.spawn(cmd, self.dir / "kernel.log", env, cwd=None if env is None else self.dir / "work",
                                     pass_fds=(filter_fd,) if filter_fd >= 0 else ())
            finally:
                if filter_fd >= 0:
                    os.close(filter_fd)
        from .bounded_client import BoundedKernelClient

        self.client = BoundedKernelClient()  # refuses kernel messages over the output bound, undecoded
        self.client.load_connection_info(_connection(str(self.dir / "k"), key))
        self.client.start_channels(hb=False)  # liveness is watched on the process itself
        await self._wait_ready(t0 + timeout)
        self.start_wall = time.monotonic() - t0
        self.start_cpu = sb.tree_cpu_seconds(self.processes())

    def _check(self, deadline: float) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"kernel {self.spec.name} exited at start ({self.proc.returncode}): "
                               + self.log_tail())
        if time.monotonic() > deadline:
            raise TimeoutError(f"kernel {self.spec.name} did not answer in time")

    async def _wait_ready(self, deadline: float) -> None:
        """kernel_info answered on shell, and iopub delivering (its subscription is asynchronous)."""
        kc = self.client
        while True:
            self._check(deadline)
            msg_id = kc.kernel_info()
            try:
                while True:
                    msg = await kc.get_shell_msg(timeout=0.5)
                    if msg["parent_header"].get("msg_id") == msg_id:
                        self.kernel_info = msg["content"]
                        break
                break
            except queue.Empty:
                continue
        while True:
            try:
                await kc.get_iopub_msg(timeout=0.2)
                break
            except queue.Empty:
                self._check(deadline)
                kc.kernel_info()
        while True:  # drain what the start-up and the probes published
            try:
                await kc.get_iopub_msg(timeout=0.05)
            except queue.Empty:
                break
        with contextlib.suppress(queue.Empty):
            while True:
                await kc.get_shell_msg(timeout=0)

    def log_tail(self, n: int = 2000) -> str:
        """The end of the kernel's own stdout/stderr."""
        try:
            return (self.dir / "kernel.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def alive(self) -> bool:
        """Whether the sandbox process is still running."""
        return self.proc is not None and self.proc.poll() is None and not self._closed

    def processes(self) -> list[psutil.Process]:
        """The sandbox's process tree (bwrap included)."""
        return sb.tree(self.proc.pid) if self.proc else []

    async def shutdown(self) -> None:
        """Kill the whole sandbox, close the client and remove its directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.stop_channels()
        if self.proc is not None:
            await asyncio.get_running_loop().run_in_executor(None, sb.kill_tree, self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.lease is not None:
            self.lease.release()  # nothing runs as its uid any more
            self.lease = None


class KernelPool:
    """Ready kernels of one kernelspec; ``size`` 0 means cold (start on demand)."""

    def __init__(self, spec: KernelSpecInfo, size: int, mode: str, runtime_dir: Path,
                 start_timeout: float = 30.0, starts: asyncio.Semaphore | None = None,
                 retries: int = 3, fork_server: ForkServer | None = None) -> None:
        self.spec = spec
        self.fork_server = fork_server if spec.adapter.forkable else None
        self.size = size
        self.mode = mode
        self.runtime_dir = runtime_dir
        self.start_timeout = start_timeout
        self.retries = retries
        self._starts = starts or asyncio.Semaphore(2)
        self._ready: deque[SandboxedKernel] = deque()
        self._waiters: deque[asyncio.Future[SandboxedKernel]] = deque()
        self._tasks: set[asyncio.Task] = set()
        self._filling = 0
        self._stopped = False
        self.stats: dict[str, Any] = {"started": 0, "failed": 0, "replaced": 0, "handed_out": 0,
                                      "start_wall_total": 0.0, "start_cpu_total": 0.0, "last_error": None}

    async def start(self) -> None:
        """Begin filling the pool (returns at once)."""
        self._refill()

    async def wait_full(self, timeout: float = 60.0) -> bool:
        """Wait until the pool holds ``size`` ready kernels."""
        deadline = time.monotonic() + timeout
        while len(self._ready) < self.size and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return len(self._ready) >= self.size

    def _refill(self) -> None:
        if self._stopped:
            return
        while len(self._ready) + self._filling < self.size + len(self._waiters):
            self._filling += 1
            task = asyncio.get_running_loop().create_task(self._fill_one())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _fill_one(self) -> None:
        try:
            for attempt in range(self.retries):
                try:
                    kernel = await self.new_kernel()
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # a kernel that dies or hangs at start is replaced
                    log.warning("kernel %s start failed (attempt %d): %s", self.spec.name, attempt + 1, e)
                    await asyncio.sleep(0.2 * (attempt + 1))
                    continue
                if self._stopped:
                    await kernel.shutdown()
                    return
                self._deliver(kernel)
                return
            if not self._stopped:  # keep a warm pool trying, slowly
                asyncio.get_running_loop().call_later(5.0, self._refill)
            err = RuntimeError(f"kernel {self.spec.name} failed to start: {self.stats['last_error']}")
            while self._waiters:
                w = self._waiters.popleft()
                if not w.done():
                    w.set_exception(err)
                    break
        finally:
            self._filling -= 1

    def _deliver(self, kernel: SandboxedKernel) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(kernel)
                return
        self._ready.append(kernel)

    async def new_kernel(self, network: bool = False) -> SandboxedKernel:
        """Start one kernel now (limited to a few concurrent starts)."""
        async with self._starts:
            fs = self.fork_server if self.fork_server is not None and self.fork_server.usable and not network \
                else None
            kernel = SandboxedKernel(self.spec, self.mode, self.runtime_dir, network, fs)
            try:
                await kernel.start(self.start_timeout)
                if fs is not None:
                    fs.note(True)
            except BaseException as e:
                if fs is not None and not isinstance(e, asyncio.CancelledError):
                    fs.note(False)
                self.stats["failed"] += 1
                self.stats["last_error"] = str(e)[-500:]
                await kernel.shutdown()
                raise
        self.stats["started"] += 1
        self.stats["start_wall_total"] += kernel.start_wall or 0.0
        self.stats["start_cpu_total"] += kernel.start_cpu or 0.0
        return kernel

    async def acquire(self, network: bool = False) -> SandboxedKernel:
        """A ready kernel for one run (the caller must ``shutdown()`` it afterwards)."""
        if self._stopped:
            raise RuntimeError("pool stopped")
        if network:  # pool kernels have no network namespace shared with the host
            self.stats["handed_out"] += 1
            return await self.new_kernel(network=True)
        while self._ready:
            kernel = self._ready.popleft()
            if kernel.alive():
                self.stats["handed_out"] += 1
                self._refill()
                return kernel
            self.stats["replaced"] += 1
            await kernel.shutdown()
        fut: asyncio.Future[SandboxedKernel] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._refill()
        try:
            kernel = await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._deliver(fut.result())
            raise
        self.stats["handed_out"] += 1
        self._refill()
        return kernel

    async def stop(self) -> None:
        """Cancel refills and shut every idle kernel down."""
        self._stopped = True
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_exception(RuntimeError("pool stopped"))
        kernels, self._ready = list(self._ready), deque()
        await asyncio.gather(*(k.shutdown() for k in kernels), return_exceptions=True)

    def health(self) -> dict[str, Any]:
        """Pool size, ready kernels and start-cost figures."""
        n = self.stats["started"] or 1
        return {"kernelspec": self.spec.name, "size": self.size, "fork_server": self.fork_server is not None, "ready": len(self._ready),
                "starting": self._filling, "started": self.stats["started"], "failed": self.stats["failed"],
                "replaced": self.stats["replaced"], "handed_out": self.stats["handed_out"],
                "avg_start_wall_s": round(self.stats["start_wall_total"] / n, 3),
                "avg_start_cpu_s": round(self.stats["start_cpu_total"] / n, 3),
                "last_error": self.stats["last_error"]}
