"""The one kernel pool (``Pool``) and kernel runs' sandboxed kernels.

``Pool`` holds ready kernels made by a factory, with a reuse policy: kernel runs' pools (``KernelPool``, one
per kernelspec) hand each ``SandboxedKernel`` out once, the caller shuts it down after its run; program runs'
pool reuses each Run-Flare kernel up to ``recycle_after`` runs. Every kernel starts through
``AsyncKernelManager`` and a provisioner named in its kernelspec. Pools refill in the background (a few
starts in parallel), replace kernels that die while waiting or hang at start, and leave nothing behind on
stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import psutil
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from jupyter_client.manager import AsyncKernelManager

from runflare_server.engine.jupyter.adapters import KernelAdapter, adapter_for
from runflare_server.engine.jupyter.bounded_client import BoundedKernelClient
from runflare_server.engine.jupyter.fork_server import ForkServer
from runflare_server.engine.jupyter.kernelspecs import StaticKernelSpecManager
from runflare_server.engine.jupyter.lean_session import LeanSession
from runflare_server.engine.jupyter.provisioner import PROVISIONER_NAME, RunflareSandboxProvisioner
from runflare_server.engine.sandbox import kernel_sandbox as sb
from runflare_server.engine.sandbox import policy

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


class PoolKernelManager(AsyncKernelManager):
    """jupyter_client's manager without the control socket it connects at every start. A pool kernel is
    killed, never asked over its control channel, so that socket, and the ZMQ context and two threads
    behind it, are made only when something does ask (jupyter_client connects it on first use)."""

    _starting = False

    async def _async_post_start_kernel(self, **kw: Any) -> None:
        self._starting = True
        try:
            await super()._async_post_start_kernel(**kw)
        finally:
            self._starting = False

    def _connect_control_socket(self) -> None:
        if not self._starting:  # a later call (an interrupt or shutdown request) connects it
            super()._connect_control_socket()


class SandboxedKernel:
    """One kernel in its own sandbox, started by ``PoolKernelManager``, with a connected client. Used once.

    With bwrap the kernelspec names the ``runflare-sandbox`` provisioner (the fork server, the network and
    the kernel dir chosen by its config); the weak modes an operator may choose explicitly (``unshare``,
    ``none``) name jupyter_client's ``local-provisioner`` around the engine's own wrapper command, so that
    the sandbox provisioner stays "bubblewrap or not at all"."""

    def __init__(self, spec: KernelSpecInfo, mode: str, runtime_dir: Path, network: bool = False,
                 fork_server: ForkServer | None = None) -> None:
        self.spec = spec
        self.fork_server = fork_server  # None once started unless the kernel was forked from it
        self.mode = mode
        self.network = network
        self.runtime_dir = runtime_dir
        self.id = secrets.token_hex(6)
        self.dir = runtime_dir / f"k-{self.id}"  # the provisioner's kernel dir once started
        self.log_path = runtime_dir / f"log-{self.id}"  # the kernel's stdout/stderr (outside its dir)
        self.km: PoolKernelManager | None = None
        self.proc: Any = None  # the sandbox's process (a Popen, or the fork server's ForkedProcess)
        self.client: Any = None
        self.start_wall: float | None = None
        self.start_cpu: float | None = None
        self.lease: policy.UidLease | None = None  # the kernel's own host uid (unshare mode; else the provisioner's)
        self.cgroup: Any = None  # its run's cgroup, made while it waits in the pool (``prepare_cgroup``)
        self._closed = False

    @property
    def sandboxed_by_provisioner(self) -> bool:
        return self.mode == "bwrap"

    def _kernel_spec(self, key: str) -> tuple[KernelSpec, dict[str, Any]]:
        """The kernelspec to start and the launch kwargs (env, cwd) for this mode."""
        spec = self.spec
        if self.sandboxed_by_provisioner:
            config = {"memory_limit": 0, "max_processes_and_or_threads": 0, "max_file_size": 0,
                      "cpu_time_limit": 0, "base_dir": str(self.runtime_dir), "enable_network": self.network,
                      "fork_server": str(self.fork_server.runtime_dir) if self.fork_server else ""}
            meta = {"kernel_provisioner": {"provisioner_name": PROVISIONER_NAME, "config": config}}
            return KernelSpec(argv=spec.argv, display_name=spec.display_name, language=spec.language,
                              env=spec.env, resource_dir=spec.resource_dir, metadata=meta), {}
        if self.network and self.mode != "none":
            raise RuntimeError("enable_network for kernel runs needs bwrap and a root server")
        meta = {"kernel_provisioner": {"provisioner_name": "local-provisioner", "config": {}}}
        env = sb.clean_env(spec.env, spec.argv[0])
        launch: dict[str, Any] = {"env": {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}}
        if self.mode == "unshare":  # the kernel reads its own copy of the connection file, at its inside path
            conn_file = f"{sb.SANDBOX_CONN}/connection.json"
            inside = dict(_connection(f"{sb.SANDBOX_CONN}/k", key), kernel_name=spec.name)
            (self.dir / "connection.json").write_text(json.dumps(inside))
            if policy.per_slot_uids():
                self.lease = policy.UidLease.acquire()
                for path in (self.dir, *self.dir.iterdir()):
                    os.chown(path, self.lease.uid, self.lease.uid)
                os.chmod(self.dir, 0o700)
            if spec.adapter.tcp_only:
                tcp_file = f"{sb.SANDBOX_CONN}/connection-tcp.json"
                argv = sb.bridged([a.replace("{connection_file}", tcp_file) for a in spec.argv], conn_file, tcp_file)
            else:
                argv = [a.replace("{connection_file}", conn_file) for a in spec.argv]
            argv = sb.unshare_argv(argv, self.dir, env=env, uid=self.lease.uid if self.lease else None)
        else:  # "none": unsandboxed, as the operator chose
            argv = list(spec.argv)
            if spec.adapter.tcp_only:
                tcp_file = str(self.dir / "connection-tcp.json")
                argv = sb.bridged([a.replace("{connection_file}", tcp_file) for a in argv], "{connection_file}",
                                  tcp_file)
            launch = {"env": {**env, "HOME": str(self.dir / "work"), "IPYTHONDIR": str(self.dir / "work/.ipython")},
                      "cwd": str(self.dir / "work")}
        return KernelSpec(argv=argv, display_name=spec.display_name, language=spec.language, env={},
                          resource_dir=spec.resource_dir, metadata=meta), launch

    async def start(self, timeout: float) -> None:
        """Start the kernel and wait until it is ready for a run (``_wait_ready``). Raises on failure."""
        t0 = time.monotonic()
        key = secrets.token_hex(16)
        if not self.sandboxed_by_provisioner:
            self.dir.mkdir(parents=True)
            (self.dir / "work").mkdir()
        kspec, launch = self._kernel_spec(key)
        km = self.km = PoolKernelManager(
            kernel_name=self.spec.name, kernel_spec_manager=StaticKernelSpecManager({self.spec.name: kspec}),
            client_factory=BoundedKernelClient, connection_file=str(self.runtime_dir / f"c-{self.id}.json"),
            transport="ipc", ip=str(self.dir / "k"), session=LeanSession())
        if not self.sandboxed_by_provisioner:  # the connection the kernel was given above
            km.load_connection_info(_connection(str(self.dir / "k"), key))
        with open(self.log_path, "ab") as out:  # not in asyncio.wait_for: on 3.11 it can swallow a cancel
            await km.start_kernel(stdout=out, stderr=subprocess.STDOUT, **launch)
        prov = km.provisioner
        if isinstance(prov, RunflareSandboxProvisioner):
            self.proc, self.dir = prov.process, prov.kernel_dir or self.dir
            if not prov.forked:
                self.fork_server = None
        else:
            self.proc = getattr(prov, "process", None)
            self.fork_server = None
        self.client = km.client()  # refuses kernel messages over the output bound, undecoded
        self.client.start_channels(hb=False)  # liveness is watched on the process itself
        await self._wait_ready(t0 + timeout)
        self.start_wall = time.monotonic() - t0

    def _check(self, deadline: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            rc = self.proc.returncode if self.proc is not None else None
            raise RuntimeError(f"kernel {self.spec.name} exited at start ({rc}): " + self.log_tail())
        if time.monotonic() > deadline:
            raise TimeoutError(f"kernel {self.spec.name} did not answer in time")

    IOPUB_PROBE = 0.05  # seconds between kernel_info probes while the last request's idle status is awaited
    DRAIN_QUIET = 0.5  # seconds of silence on a delivering iopub that end the wait (a kernel without idle status)

    async def _wait_ready(self, deadline: float) -> None:
        """The first request answered on shell, and iopub delivering (its subscription is asynchronous).

        The first request is the kernel's warm-up cell when its adapter has one (silent: no execution count,
        no history, nothing in the user's namespace), else kernel_info: one round trip, not two, for a kernel
        with a warm-up. The wait then ends at the idle status of the last request sent, the last thing the
        kernel publishes before a run: the warm-up's when iopub was subscribed before the kernel published
        it, else a kernel_info probe's, sent each ``IOPUB_PROBE`` s without a message (what a kernel publishes
        before the subscription is through is lost, not late; ipykernel's ``iopub_welcome`` says the
        subscription is through, not whether it was in time). A kernel without a warm-up is ready once iopub
        has delivered and gone quiet for 10 ms."""
        kc = self.client
        warmup = self.spec.adapter.warmup()
        if warmup is None:
            while True:  # kernel_info again every 0.5 s until one is answered
                self._check(deadline)
                last = kc.kernel_info()
                if await self._shell_reply(last, 0.5) is not None:
                    break
        else:  # the request waits in the shell socket's queue until the kernel is there to take it
            last = kc.execute(warmup, silent=True, store_history=False)
            while (reply := await self._shell_reply(last, 0.5)) is None:
                self._check(deadline)
            if reply["content"].get("status") != "ok":  # what it installs, a run relies on
                raise RuntimeError(f"kernel {self.spec.name}: its warm-up cell failed: "
                                   f"{reply['content'].get('ename')}: {reply['content'].get('evalue')}")
        quiet = 0.01 if warmup is None else self.DRAIN_QUIET
        probe_at, heard = time.monotonic() + self.IOPUB_PROBE, None
        while True:
            try:
                msg = await kc.next_msg("iopub", 0.01)
            except TimeoutError:
                now = time.monotonic()
                if heard is not None and now - heard >= quiet:
                    break
                self._check(deadline)
                if now >= probe_at:
                    last = kc.kernel_info()
                    probe_at = now + self.IOPUB_PROBE
                continue
            heard = time.monotonic()
            probe_at = heard + self.IOPUB_PROBE  # iopub delivers: probe again only after a silence
            if msg["parent_header"].get("msg_id") == last and msg["msg_type"] == "status" and \
                    msg["content"].get("execution_state") == "idle":
                break
        with contextlib.suppress(TimeoutError):  # the probes' replies (a run skips other parents anyway)
            while True:
                await kc.next_msg("shell", 0)

    async def _shell_reply(self, msg_id: str, wait: float) -> dict[str, Any] | None:
        """The shell reply to ``msg_id`` (replies to other requests are skipped), or None if it did not
        come within ``wait`` seconds."""
        end = time.monotonic() + wait
        while True:
            try:
                msg = await self.client.next_msg("shell", max(0.0, end - time.monotonic()))
            except TimeoutError:
                return None
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg

    def prepare_cgroup(self) -> None:
        """Put the kernel's whole tree in a fresh cgroup of its own while it waits in the pool, so that no
        run waits for the group's creation and the move (3-13 ms with cgroup v1). No limits yet: the kernel
        runs no user code before its run sets them (``KernelRuns._confine``). Without a hierarchy, nothing."""
        procs = self.processes()
        self.start_cpu = sb.tree_cpu_seconds(procs)  # its start's CPU, read on the same walk of its tree
        group = sb.create_cgroup(f"run-{os.getpid()}-k{self.id}", None, None)
        if group is None:
            return
        try:
            for p in procs:
                group.add_pid(p.pid)
        except OSError as e:
            log.warning("could not move kernel %s into its cgroup: %s", self.id, e)
            group.remove()
            return
        self.cgroup = group

    def kill_now(self) -> None:
        """SIGKILL the kernel's processes (its cgroup's, else its tree's) without waiting for them: nothing
        of a run goes on once its result is known. ``shutdown`` waits for them and cleans up.

        A forked kernel's processes are all in the PID namespace whose init is ``proc`` (none can leave it),
        and the init's death makes Linux SIGKILL every one of them: that one kill is enough. Each kill costs
        the event loop 0.2-3 ms here (the woken process preempts the server), so one instead of one per
        process halves what a run's end waits for."""
        prov = self.km.provisioner if self.km is not None else None
        if isinstance(prov, RunflareSandboxProvisioner):
            prov.killed = True
        init = self.proc.pid if isinstance(prov, RunflareSandboxProvisioner) and prov.forked else None
        if self.cgroup is not None:
            with contextlib.suppress(OSError):
                pids = self.cgroup.pids()
                if init in pids:  # while it is there to kill, the namespace's end does the rest
                    pids = [init]
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                return
        procs = self.processes()  # the tree, its root first
        if init is not None and procs and procs[0].pid == init:
            procs = procs[:1]
        for p in reversed(procs):
            with contextlib.suppress(psutil.Error):
                p.kill()

    def log_tail(self, n: int = 2000) -> str:
        """The end of the kernel's own stdout/stderr."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def alive(self) -> bool:
        """Whether the sandbox process is still running."""
        return self.proc is not None and self.proc.poll() is None and not self._closed

    def processes(self) -> list[psutil.Process]:
        """The sandbox's process tree (bwrap, or the forked kernel's namespace init, included)."""
        return sb.tree(self.proc.pid) if self.proc is not None else []

    def members(self) -> list[psutil.Process]:
        """The kernel's processes: its cgroup's, read at once, when it waits in one (``prepare_cgroup`` put
        its whole tree there, and all they start stays there), else its tree (``processes``)."""
        if self.cgroup is None:
            return self.processes()
        try:
            pids = self.cgroup.pids()
        except OSError:
            return self.processes()
        procs = []
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(pid))
        return procs

    def exit_status(self) -> tuple[int | None, int | None]:
        """``(exit code, signal)`` of the kernel once it is gone (exact when it was forked)."""
        if self.proc is None or self.proc.poll() is None:
            return None, None
        prov = self.km.provisioner if self.km is not None else None
        if isinstance(prov, RunflareSandboxProvisioner):
            return prov.exit_status()
        rc = self.proc.returncode
        if rc < 0:
            return None, -rc
        return (None, rc - 128) if rc > 128 else (rc, None)

    async def shutdown(self) -> None:
        """Kill the whole sandbox (``shutdown_kernel(now=True)``), close the client, remove its files.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.stop_channels()
        if self.km is not None:
            if not self.sandboxed_by_provisioner and self.proc is not None:  # LocalProvisioner kills one group
                await asyncio.get_running_loop().run_in_executor(None, sb.kill_tree, self.proc)
            try:
                await self.km.shutdown_kernel(now=True)
            except Exception as e:  # noqa: BLE001 - a kernel that never started has nothing to shut down
                log.debug("kernel %s: shutdown: %s", self.id, e)
                if self.proc is not None and self.proc.poll() is None:
                    await asyncio.get_running_loop().run_in_executor(None, sb.kill_tree, self.proc)
        with contextlib.suppress(OSError):
            self.log_path.unlink()
        with contextlib.suppress(OSError):
            (self.runtime_dir / f"c-{self.id}.json").unlink()
        if not self.sandboxed_by_provisioner:
            shutil.rmtree(self.dir, ignore_errors=True)
        if self.cgroup is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.cgroup.remove)
        if self.lease is not None:
            self.lease.release()  # nothing runs as its uid any more
            self.lease = None


class PoolKernel(Protocol):
    """What a pool needs of a kernel."""

    def alive(self) -> bool: ...

    async def shutdown(self) -> None: ...


K = TypeVar("K", bound=PoolKernel)


class Demand:
    """Arrivals over a sliding window and the time a kernel takes to start: how many ready kernels a pool
    needs so that a request arriving at the current rate finds one (Little's law, with half again as margin)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.arrivals: deque[float] = deque()
        self.start_seconds = 0.0  # moving average of recent starts

    def arrive(self, now: float) -> None:
        self.arrivals.append(now)

    def started(self, seconds: float) -> None:
        self.start_seconds = seconds if not self.start_seconds else 0.7 * self.start_seconds + 0.3 * seconds

    def rate(self, now: float) -> float:
        """Arrivals per second over the window."""
        while self.arrivals and self.arrivals[0] < now - self.window:
            self.arrivals.popleft()
        return len(self.arrivals) / self.window

    def wanted(self, now: float) -> int:
        """Kernels taken while one starts, at the current rate (0 once the window saw no arrival)."""
        return math.ceil(1.5 * self.rate(now) * self.start_seconds)


class Pool(Generic[K]):
    """Ready kernels made by one factory, handed out and reused by one policy: a kernel serves up to
    ``reuse`` runs (1: used once, as kernel runs' kernels; more: program runs' Run-Flare kernels, recycled
    after ``recycle_after`` runs). ``size`` 0 means cold (start on demand). It refills in the background (a
    few starts in parallel), replaces kernels that die while waiting or fail to start, and leaves nothing
    behind on stop.

    A used-once pool with ``max_size`` above ``size`` adapts to its arrival rate: it keeps as many ready as
    are taken while one starts (``Demand``), between ``size`` and ``max_size``, and gives back what a
    quieter window no longer needs.

    ``handed_off``: the caller keeps what it takes and never gives it back (``release``); the pool forgets a
    kernel when it hands it out (kernel runs: the run shuts its kernel down)."""

    REFILL_DELAY = 0.1  # seconds between a hand-out that leaves kernels ready and its refill

    def __init__(self, name: str, factory: Callable[[], Awaitable[K]], size: int, *, reuse: int = 1,
                 starts: asyncio.Semaphore | None = None, retries: int = 3, max_size: int | None = None,
                 window: float = 10.0, handed_off: bool = False) -> None:
        self.name = name
        self.factory = factory
        self.handed_off = handed_off
        self.min_size = size
        self.size = size  # the current target: min_size, more while demand needs it
        self.reuse = max(1, reuse)
        self.max_size = max(size, max_size or size) if self.reuse == 1 else size
        self.demand = Demand(window)
        self._shrink_timer: asyncio.TimerHandle | None = None
        self._refill_timer: asyncio.TimerHandle | None = None
        self.retries = retries
        self._starts = starts or asyncio.Semaphore(2)
        self._ready: deque[K] = deque()
        self._waiters: deque[asyncio.Future[K]] = deque()
        self._tasks: set[asyncio.Task] = set()  # refills
        self._closing: set[asyncio.Task] = set()  # shutdowns of kernels that left the pool (stop awaits them)
        self._uses: dict[K, int] = {}  # every live kernel of the pool (ready or handed out) -> runs served
        self._filling = 0
        self._stopped = False
        self.stats: dict[str, Any] = {"started": 0, "failed": 0, "replaced": 0, "handed_out": 0, "recycled": 0,
                                      "last_error": None}

    @property
    def kernels(self) -> list[K]:
        """Every live kernel of the pool, ready or handed out."""
        return list(self._uses)

    async def start(self) -> None:
        """Begin filling the pool (returns at once)."""
        self._refill()

    async def wait_full(self, timeout: float = 60.0) -> bool:
        """Wait until the pool holds its current target of ready kernels."""
        deadline = time.monotonic() + timeout
        while len(self._ready) < self.size and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return len(self._ready) >= self.size

    async def wait_settled(self) -> int:
        """Wait until no start is in progress (every first start came up or gave up); the ready count."""
        await asyncio.sleep(0)
        while self._filling and len(self._ready) < self.size:
            await asyncio.sleep(0.05)
        return len(self._ready)

    def _retarget(self) -> None:
        """Set the target from the demand; ready kernels beyond a lower target are shut down. While above
        ``min_size`` it checks again every half window, so an idle pool shrinks back."""
        if self.max_size == self.min_size or self._stopped:
            return
        target = min(self.max_size, max(self.min_size, self.demand.wanted(time.monotonic())))
        grew = target > self.size
        if target != self.size:
            log.debug("pool %s: target %d -> %d", self.name, self.size, target)
        self.size = target
        while len(self._ready) > target:
            self._discard(self._ready.popleft())  # the longest idle
        if self._shrink_timer is not None:
            self._shrink_timer.cancel()
            self._shrink_timer = None
        if target > self.min_size:
            self._shrink_timer = asyncio.get_running_loop().call_later(self.demand.window / 2, self._retarget)
        if grew:
            self._refill()

    def _refill_soon(self) -> None:
        """Refill at once when no kernel is left ready; else a moment later, so that the start (CPU and
        this loop's time) does not compete with the run that just took a kernel, which is usually over
        by then."""
        if not self._ready:
            self._refill()
        elif self._refill_timer is None:  # (one pending refill counts the pool when it fires)
            self._refill_timer = asyncio.get_running_loop().call_later(self.REFILL_DELAY, self._refill_later)

    def _refill_later(self) -> None:
        self._refill_timer = None
        self._refill()

    def _refill(self) -> None:
        if self._stopped:
            return
        # a used-once pool keeps ``size`` ready and starts one for each waiter; a reusing pool keeps ``size``
        # kernels in all (ready or busy), and waiters wait for one to come back
        want = self.size + (len(self._waiters) if self.reuse == 1 else 0)
        while len(self._uses) - self._retiring() + self._filling < want:
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
                    log.warning("kernel %s start failed (attempt %d): %s", self.name, attempt + 1, e)
                    await asyncio.sleep(0.2 * (attempt + 1))
                    continue
                if self._stopped:
                    self._discard(kernel)
                    return
                self._deliver(kernel)
                return
            if not self._stopped:  # keep a warm pool trying, slowly
                asyncio.get_running_loop().call_later(5.0, self._refill)
            err = RuntimeError(f"kernel {self.name} failed to start: {self.stats['last_error']}")
            while self._waiters:
                w = self._waiters.popleft()
                if not w.done():
                    w.set_exception(err)
                    break
        finally:
            self._filling -= 1

    def _retiring(self) -> int:
        """Reused kernels on (or waiting for) their last run: each one's replacement starts meanwhile, so
        that no run waits for a recycled kernel's successor to start."""
        return sum(1 for uses in self._uses.values() if uses >= self.reuse - 1) if self.reuse > 1 else 0

    def _deliver(self, kernel: K) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(kernel)
                return
        if self.reuse == 1 and len(self._ready) >= self.size:  # started for a demand that has passed
            self._discard(kernel)
            return
        self._ready.append(kernel)

    async def new_kernel(self) -> K:
        """Start one kernel now (limited to a few concurrent starts); it belongs to the pool."""
        async with self._starts:
            t0 = time.monotonic()
            try:
                kernel = await self.factory()
            except BaseException as e:
                if not isinstance(e, asyncio.CancelledError):
                    self.stats["failed"] += 1
                    self.stats["last_error"] = str(e)[-500:]
                raise
        self.demand.started(time.monotonic() - t0)
        self.stats["started"] += 1
        self._uses[kernel] = 0
        self._retarget()  # the start time just measured may change what the demand needs
        return kernel

    async def acquire(self) -> K:
        """A ready kernel for one run; give it back with ``release``."""
        if self._stopped:
            raise RuntimeError("pool stopped")
        self.demand.arrive(time.monotonic())
        self._retarget()
        while self._ready:
            kernel = self._ready.popleft()
            if kernel.alive():
                self._hand_out(kernel)
                self._refill_soon()
                return kernel
            self.stats["replaced"] += 1
            self._discard(kernel)
        fut: asyncio.Future[K] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._refill()
        try:
            kernel = await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._deliver(fut.result())
            raise
        self._hand_out(kernel)
        self._refill()
        return kernel

    def _hand_out(self, kernel: K) -> None:
        self.stats["handed_out"] += 1
        if self.handed_off:
            self._uses.pop(kernel, None)  # the caller's from now on

    async def release(self, kernel: K, healthy: bool = True) -> None:
        """Take a kernel back after a run: ready again while it is healthy, alive and under ``reuse`` runs,
        else shut down in the background (and replaced by the refill at once)."""
        uses = self._uses.get(kernel, 0) + 1
        # a reused kernel past its runs still serves while its successor starts and nothing else is ready
        successor_starting = uses >= self.reuse > 1 and self._filling > 0 and not self._ready
        if healthy and (uses < self.reuse or successor_starting) and not self._stopped and kernel.alive():
            self._uses[kernel] = uses
            self._deliver(kernel)
            if uses == self.reuse - 1:  # its next run is its last: its successor starts now
                self._refill()
            return
        if self.reuse > 1:  # (a used-once kernel's end is no replacement)
            self.stats["recycled"] += 1
        self._discard(kernel)
        self._refill()

    def _discard(self, kernel: K) -> asyncio.Task:
        """Take a kernel out of the pool and shut it down in a task of the pool's own: no run waits for
        it, no caller's cancellation interrupts it halfway, and ``stop`` waits for it."""
        self._uses.pop(kernel, None)
        task = asyncio.get_running_loop().create_task(self._shutdown(kernel))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return task

    async def _shutdown(self, kernel: K) -> None:
        try:
            await kernel.shutdown()
        except Exception:  # noqa: BLE001 - logged; stop() still waits for the others
            log.exception("kernel %s: shutdown failed", self.name)

    async def stop(self) -> None:
        """Cancel refills and shut every kernel of the pool down (idle or handed out)."""
        self._stopped = True
        for timer in (self._shrink_timer, self._refill_timer):
            if timer is not None:
                timer.cancel()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_exception(RuntimeError("pool stopped"))
        kernels, self._ready = list(self._uses), deque()
        for kernel in kernels:
            self._discard(kernel)
        while self._closing:  # every shutdown the pool began, including those of kernels already returned
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    def health(self) -> dict[str, Any]:
        """Pool size, ready kernels and start figures."""
        return {"size": self.size, "min_size": self.min_size, "max_size": self.max_size, "ready": len(self._ready),
                "starting": self._filling, "kernels": len(self._uses),
                "started": self.stats["started"], "failed": self.stats["failed"], "replaced": self.stats["replaced"],
                "handed_out": self.stats["handed_out"], "last_error": self.stats["last_error"]}


class KernelPool(Pool[SandboxedKernel]):
    """Ready sandboxed kernels of one kernelspec, each used once (the caller shuts it down after its run)."""

    def __init__(self, spec: KernelSpecInfo, size: int, mode: str, runtime_dir: Path,
                 start_timeout: float = 30.0, starts: asyncio.Semaphore | None = None,
                 retries: int = 3, fork_server: ForkServer | None = None, max_size: int | None = None,
                 window: float = 10.0) -> None:
        super().__init__(spec.name, self._start_kernel, size, reuse=1, starts=starts, retries=retries,
                         max_size=max_size, window=window, handed_off=True)
        self.spec = spec
        self.fork_server = fork_server.register() if fork_server is not None and spec.adapter.forkable else None
        self.mode = mode
        self.runtime_dir = runtime_dir
        self.start_timeout = start_timeout
        self.stats.update(start_wall_total=0.0, start_cpu_total=0.0)
        self._network = False

    async def _start_kernel(self, network: bool = False) -> SandboxedKernel:
        fs = self.fork_server if self.fork_server is not None and self.fork_server.usable and not network else None
        kernel = SandboxedKernel(self.spec, self.mode, self.runtime_dir, network, fs)
        try:
            await kernel.start(self.start_timeout)
        except BaseException as e:
            if fs is not None and not isinstance(e, asyncio.CancelledError):
                fs.note(False)
            await kernel.shutdown()
            raise
        if kernel.fork_server is not None:
            kernel.fork_server.note(True)
        try:
            await asyncio.get_running_loop().run_in_executor(None, kernel.prepare_cgroup)
        except BaseException:
            await kernel.shutdown()
            raise
        self.stats["start_wall_total"] += kernel.start_wall or 0.0
        self.stats["start_cpu_total"] += kernel.start_cpu or 0.0
        return kernel

    async def acquire(self, network: bool = False) -> SandboxedKernel:
        """A ready kernel for one run (the caller must ``shutdown()`` it afterwards). A kernel with
        ``network`` is started for the run (pool kernels have no network)."""
        if self._stopped:
            raise RuntimeError("pool stopped")
        if network:
            async with self._starts:
                try:
                    kernel = await self._start_kernel(network=True)
                except Exception as e:
                    self.stats["failed"] += 1
                    self.stats["last_error"] = str(e)[-500:]
                    raise
            self.stats["started"] += 1
            self.stats["handed_out"] += 1
            return kernel
        return await super().acquire()

    def health(self) -> dict[str, Any]:
        """Pool size, ready kernels and start-cost figures."""
        n = self.stats["started"] or 1
        h = super().health()
        h.pop("kernels")
        return {"kernelspec": self.spec.name, "fork_server": self.fork_server is not None, **h,
                "avg_start_wall_s": round(self.stats["start_wall_total"] / n, 3),
                "avg_start_cpu_s": round(self.stats["start_cpu_total"] / n, 3)}
