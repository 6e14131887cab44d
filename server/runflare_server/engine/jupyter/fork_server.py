"""The ipykernel fork server, seen from the host: starting it, mapping its uid block, asking it for a kernel.

The program itself runs inside its sandbox (``zygote``); this module is the host side. A server shares one
``ForkServer`` per runtime dir (``shared``): the ``runflare-sandbox`` provisioner finds it by that dir, named
in its ``fork_server`` config, and forks ipykernels from it instead of starting bubblewrap for each one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil

from runflare_server.engine.sandbox import kernel_sandbox as sb
from runflare_server.engine.sandbox import policy

log = logging.getLogger(__name__)
_SHARED: dict[str, ForkServer] = {}


def read_status_file(path: Path) -> int:
    """The exit status a forked kernel's init wrote. The file sits in a dir the sandbox can write, so it
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
        if self.returncode is None and sb.exited(self.pid):
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

    @classmethod
    def shared(cls, runtime_dir: Path | str) -> ForkServer:
        """The fork server of ``runtime_dir`` in this process (made on first use; started on first fork)."""
        key = os.path.realpath(runtime_dir)
        if key not in _SHARED:
            _SHARED[key] = cls(Path(runtime_dir))
        return _SHARED[key]

    def register(self) -> ForkServer:
        """Make this the shared fork server of its runtime dir (replacing any other); returns it."""
        _SHARED[os.path.realpath(self.runtime_dir)] = self
        return self

    def __init__(self, runtime_dir: Path) -> None:
        self.runtime_dir = runtime_dir
        self.proc: subprocess.Popen | None = None
        self.lease: policy.UidLease | None = None
        self._kernel_uids: dict[int, ForkedProcess] = {}  # uid inside the namespace -> the kernel holding it
        self._lock = asyncio.Lock()
        self._zygote_pid: int | None = None  # the zygote's host pid, once a fork found it
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
                os.chown(path, host_uid, host_uid, follow_symlinks=False)
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
        """The host pid of the zygote's child ``ns_pid`` (its pid in the zygote's namespace, the second of its
        pids; the child is also PID 1 of its own). The zygote's new children are read first (its known
        kernels skipped); the whole tree only to find the zygote."""
        known = {kernel.pid for kernel in self._kernel_uids.values()}
        if self._zygote_pid is not None:
            for pid in sb.child_pids(self._zygote_pid) - known:
                ids = sb.ns_pids(pid)
                if len(ids) > 1 and ids[1] == ns_pid:
                    return pid
        for p in sb.tree(self.proc.pid if self.proc else 0):
            ids = sb.ns_pids(p.pid)
            if len(ids) > 1 and ids[1] == ns_pid:
                with contextlib.suppress(psutil.Error):
                    self._zygote_pid = p.ppid()
                return p.pid
        raise RuntimeError(f"forked kernel {ns_pid} not found")

    def close(self) -> None:
        """Kill the fork server (kernels it forked die with its namespace) and give its uids back."""
        if self.proc is not None:
            sb.kill_tree(self.proc)
            for f in (self.proc.stdin, self.proc.stdout):
                with contextlib.suppress(Exception):
                    f.close()
            self.proc = None
        self._zygote_pid = None
        self._kernel_uids.clear()
        if self.lease is not None:
            self.lease.release()
            self.lease = None
