"""Per-run resource limits: a cgroup per run (v2 or v1) where the host allows it, else rlimits.

Usage::

    cg = RunCgroup.create("run-abc", memory_kb=128_000, max_pids=60)   # None → use rlimits only
    proc = subprocess.Popen(argv, preexec_fn=child_setup(limits, cg))   # joins the group before exec
    ...
    cg.peak_memory_kb(); cg.oom_killed(); cg.cpu_seconds(); cg.kill_all(); cg.remove()

Groups are created below the calling process's own cgroup, in a ``runflare`` sub-group. A process that
starts runs one after another keeps a ``GroupPool``: fresh groups made ahead by a background thread,
deleted by it after their run, so no run waits for mkdir/rmdir.

Joining: with cgroup v1 the child writes ``0`` to each group's ``tasks`` file. Right after fork it is
single-threaded, so this moves the whole process, and the kernel migrates the current thread without
the global threadgroup lock, whose write side waits for an RCU grace period (3-13 ms per run when
joining through ``cgroup.procs``). A program run's reaper joins the same way, at its start, through
join files the runner opened for it (``open_join_files``): no process is started just to join.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import resource
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path

import psutil

from runflare_server.engine.interface import Limits

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_PARENT = "runflare"
_V1_CONTROLLERS = ("memory", "pids", "cpuacct")
_NAME_RE = re.compile(r"[^A-Za-z0-9_.-]")


def _own_paths() -> dict[str, str]:
    """Controller (or "" for v2) → this process's cgroup path, from /proc/self/cgroup."""
    paths: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrls, path = line.split(":", 2)
            for ctrl in ctrls.split(",") if ctrls else [""]:
                paths[ctrl] = path
    return paths


def _v1_mounts() -> dict[str, tuple[Path, str]]:
    """Controller → (mount point, mount root) for cgroup v1 hierarchies."""
    mounts: dict[str, tuple[Path, str]] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            pre, _, post = line.partition(" - ")
            fields, post_fields = pre.split(), post.split()
            if len(post_fields) < 3 or post_fields[0] != "cgroup":
                continue
            for opt in post_fields[2].split(","):
                if opt in _V1_CONTROLLERS:
                    mounts[opt] = (Path(fields[4]), fields[3])
    return mounts


def _try_make(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        # a name per thread: two threads detecting at once must not remove each other's probe
        probe = path / f"probe-{os.getpid()}-{threading.get_ident()}"
        probe.mkdir(exist_ok=True)
        probe.rmdir()
        return True
    except OSError:
        return False


@functools.cache
def _detect() -> tuple[str, dict[str, Path]]:
    """Find the writable hierarchy: ("cgroup-v2", {"": parent}) / ("cgroup-v1", {ctrl: parent}) / ("rlimit", {})."""
    if os.environ.get("RUNFLARE_CGROUPS", "").lower() in ("0", "off", "no", "false"):
        return "rlimit", {}  # forced off (tests, hosts where cgroups misbehave)
    own = _own_paths()
    if (_CGROUP_ROOT / "cgroup.controllers").exists():
        base = _CGROUP_ROOT / own.get("", "/").lstrip("/")
        parent = base / _PARENT
        if _try_make(parent) and _enable_v2_controllers(base, parent):
            return "cgroup-v2", {"": parent}
        return "rlimit", {}
    mounts = _v1_mounts()
    if "memory" not in mounts or "pids" not in mounts:
        return "rlimit", {}
    parents: dict[str, Path] = {}
    for ctrl, (mnt, root) in mounts.items():
        rel = os.path.relpath(own.get(ctrl, "/"), root) if own.get(ctrl, "/").startswith(root) else "."
        parent = (mnt / rel / _PARENT).resolve()
        if _try_make(parent):
            parents[ctrl] = parent
    if "memory" in parents and "pids" in parents:
        return "cgroup-v1", parents
    return "rlimit", {}


def _enable_v2_controllers(base: Path, parent: Path) -> bool:
    """Enable memory+pids (+cpu if offered) for groups below ``parent``."""
    try:
        available = (base / "cgroup.controllers").read_text().split()
        if not {"memory", "pids"} <= set(available):
            return False
        wanted = [c for c in ("memory", "pids", "cpu") if c in available]
        enabled = (base / "cgroup.subtree_control").read_text().split()
        missing = [c for c in wanted if c not in enabled]
        if missing:
            (base / "cgroup.subtree_control").write_text(" ".join("+" + c for c in missing))
        (parent / "cgroup.subtree_control").write_text(" ".join("+" + c for c in wanted))
        return True
    except OSError:
        return False


def mechanism() -> str:
    """The limit mechanism in force: "cgroup-v2", "cgroup-v1" or "rlimit" (detected once)."""
    return _detect()[0]


_STALE_RE = re.compile(r"run-(\d+)-")


def sweep_stale() -> int:
    """Remove run groups left by a process that died without cleaning up (a killed server or kernel).
    Group names carry their creator's pid (``run-<pid>-...``); only groups of dead creators go."""
    removed = 0
    for parent in _detect()[1].values():
        with contextlib.suppress(OSError):
            for child in parent.iterdir():
                match = _STALE_RE.match(child.name)
                if not child.is_dir() or not match or psutil.pid_exists(int(match.group(1))):
                    continue
                stale = RunCgroup(mechanism(), {"": child})
                stale.kill_all(timeout=1.0)
                with contextlib.suppress(OSError):
                    child.rmdir()
                    removed += 1
    return removed


def _read(path: Path) -> str | None:
    """A control file's text, or None when it cannot be read. Plain reads of the file descriptor: a run
    reads its group's CPU a few times, and pathlib's text layer cost the Run-Flare kernel more than the
    kernel's own read (8% of the Run-Flare kernel's time in a batch of program runs)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    except OSError:
        return None
    finally:
        os.close(fd)


class RunCgroup:
    """One cgroup (one directory per v1 controller) holding one run's processes."""

    def __init__(self, kind: str, dirs: dict[str, Path]) -> None:
        self.kind = kind
        self.dirs = dirs
        self._removed = False

    @classmethod
    def create(cls, name: str, memory_kb: int | None, max_pids: int | None) -> RunCgroup | None:
        """Create the group with its limits; None when no writable hierarchy (callers use rlimits)."""
        kind, parents = _detect()
        if kind == "rlimit":
            return None
        name = _NAME_RE.sub("_", name)[:100] or "run"
        dirs: dict[str, Path] = {}
        try:
            for ctrl, parent in parents.items():
                d = parent / name
                d.mkdir(exist_ok=True)
                dirs[ctrl] = d
            group = cls(kind, dirs)
            group.set_limits(memory_kb, max_pids)
            return group
        except OSError:
            cls(kind, dirs).remove()
            return None

    def set_limits(self, memory_kb: int | None, max_pids: int | None) -> None:
        """Cap the group's memory (KB) and process count; None leaves that limit as it is."""
        if self.kind == "cgroup-v2":
            d = self.dirs[""]
            if memory_kb is not None:
                (d / "memory.max").write_text(str(memory_kb * 1024))
                with contextlib.suppress(OSError):
                    (d / "memory.swap.max").write_text("0")
            if max_pids is not None:
                (d / "pids.max").write_text(str(max_pids))
            return
        mem = self.dirs["memory"]
        if memory_kb is not None:
            (mem / "memory.limit_in_bytes").write_text(str(memory_kb * 1024))
            with contextlib.suppress(OSError):  # no swap accounting on this kernel: nothing to cap
                (mem / "memory.memsw.limit_in_bytes").write_text(str(memory_kb * 1024))
        if max_pids is not None:
            (self.dirs["pids"] / "pids.max").write_text(str(max_pids))

    def procs_files(self) -> list[str]:
        """The cgroup.procs files a process writes its pid to, to join the group."""
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    def join_files(self) -> list[str]:
        """The files a freshly forked (single-threaded) child writes ``0`` to, to join the group: v1's
        ``tasks`` (no RCU grace period, see the module doc), v2's ``cgroup.procs``."""
        name = "tasks" if self.kind == "cgroup-v1" else "cgroup.procs"
        return [str(d / name) for d in self.dirs.values()]

    def open_join_files(self) -> list[int]:
        """The join files opened for writing (close-on-exec: a child gets them through ``pass_fds``), for a
        process that joins by writing ``0`` to each; the caller closes them. Raises ``OSError`` saying which
        group cannot be joined."""
        fds: list[int] = []
        try:
            for path in self.join_files():
                fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
        except OSError as e:
            for fd in fds:
                os.close(fd)
            raise OSError(e.errno, f"cannot join cgroup {e.filename}: {e.strerror}") from None
        return fds

    def add_pid(self, pid: int) -> None:
        """Move process ``pid`` into the group."""
        for f in self.procs_files():
            Path(f).write_text(str(pid))

    def pids(self) -> list[int]:
        """Processes currently in the group."""
        d = self.dirs.get("") or self.dirs["pids"]
        text = _read(d / "cgroup.procs") or ""
        return [int(p) for p in text.split()]

    def peak_memory_kb(self) -> int | None:
        """Peak memory use of the group, in KB."""
        if self.kind == "cgroup-v2":
            text = _read(self.dirs[""] / "memory.peak")
        else:
            text = _read(self.dirs["memory"] / "memory.max_usage_in_bytes")
        return int(text) // 1024 if text and text.strip().isdigit() else None

    def oom_killed(self) -> bool:
        """Whether the kernel OOM-killed a process of the group (memory limit hit)."""
        if self.kind == "cgroup-v2":
            text = _read(self.dirs[""] / "memory.events") or ""
        else:
            text = _read(self.dirs["memory"] / "memory.oom_control") or ""
        m = re.search(r"^oom_kill (\d+)", text, re.M)
        return bool(m and int(m.group(1)) > 0)

    def cpu_seconds(self) -> float | None:
        """CPU time (user+system) used by the group's processes so far."""
        if self.kind == "cgroup-v2":
            m = re.search(r"^usage_usec (\d+)", _read(self.dirs[""] / "cpu.stat") or "", re.M)
            return int(m.group(1)) / 1e6 if m else None
        if "cpuacct" not in self.dirs:
            return None
        text = _read(self.dirs["cpuacct"] / "cpuacct.usage")
        return int(text) / 1e9 if text and text.strip().isdigit() else None

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every process of the group until it is empty (the pids limit bounds fork bombs)."""
        if self.kind == "cgroup-v2" and (self.dirs[""] / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                (self.dirs[""] / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + timeout
        pause = 0.0005
        while time.monotonic() < deadline:
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(pause)  # usually a sandbox's init already dying: short waits first
            pause = min(pause * 2, 0.005)

    def remove(self) -> None:
        """Kill what is left and delete the group's directories."""
        if self._removed:
            return
        self._removed = True
        if self.dirs:
            self.kill_all()
        for d in self.dirs.values():
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)

    def __enter__(self) -> RunCgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def rlimit_values(limits: Limits, use_cgroup: bool) -> dict[int, tuple[int, int]]:
    """The rlimits a run's process gets. With a cgroup, memory and processes are left to the group,
    unless the limits ask for a per-process memory limit (Judge0's flag): then RLIMIT_AS applies."""
    cpu = max(1, math.ceil(limits.cpu_time_limit + limits.cpu_extra_time))
    values: dict[int, tuple[int, int]] = {
        resource.RLIMIT_CPU: (cpu, cpu + 1),
        resource.RLIMIT_CORE: (0, 0),
        resource.RLIMIT_FSIZE: (limits.max_file_size * 1024,) * 2,
    }
    if limits.stack_limit > 0:
        values[resource.RLIMIT_STACK] = (limits.stack_limit * 1024,) * 2
    if not use_cgroup or limits.enable_per_process_and_thread_memory_limit:
        values[resource.RLIMIT_AS] = (limits.memory_limit * 1024,) * 2
    if not use_cgroup:
        values[resource.RLIMIT_NPROC] = (limits.max_processes_and_or_threads,) * 2
    return values


def rlimit_preexec(limits: Limits, cgroup: RunCgroup | None = None) -> Callable[[], None]:
    """A ``preexec_fn`` that joins ``cgroup`` (if any) and sets the run's rlimits in the child."""
    return child_setup(rlimit_values(limits, cgroup is not None), cgroup)


PRLIMIT = "/usr/bin/prlimit"
_PRLIMIT_NAMES = {resource.RLIMIT_CPU: "cpu", resource.RLIMIT_CORE: "core", resource.RLIMIT_FSIZE: "fsize",
                  resource.RLIMIT_STACK: "stack", resource.RLIMIT_AS: "as", resource.RLIMIT_NPROC: "nproc"}


def exec_prefix_usable() -> bool:
    """Whether ``exec_prefix`` can stand in for ``child_setup``'s rlimits here: as root (so no rlimit is
    refused, as child_setup would silently skip), with util-linux's prlimit."""
    return os.geteuid() == 0 and os.access(PRLIMIT, os.X_OK)


def exec_prefix(values: dict[int, tuple[int, int]]) -> list[str]:
    """An argv prefix setting these rlimits without a ``preexec_fn``, so that Popen can vfork instead of
    copying this (large) process: prlimit sets them and execs the command, in the same process before the
    command's first instruction. None (an empty prefix) without rlimits to set: a sandbox started ahead of
    its run, whose reaper sets them. The group is not joined here: a program run's reaper joins it."""
    limits = []
    for res, (soft, hard) in values.items():
        fmt = ["unlimited" if v == resource.RLIM_INFINITY else str(v) for v in (soft, hard)]
        limits.append(f"--{_PRLIMIT_NAMES[res]}={fmt[0]}:{fmt[1]}")
    return [PRLIMIT, *limits, "--"] if limits else []


def child_setup(values: dict[int, tuple[int, int]], cgroup: RunCgroup | None = None) -> Callable[[], None]:
    """A ``preexec_fn`` that joins ``cgroup`` (if any), then sets these rlimits in the child."""
    procs = cgroup.join_files() if cgroup else []

    def setup() -> None:
        for f in procs:
            fd = os.open(f, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        for res, (soft, hard) in values.items():
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(res, (soft, hard))

    return setup


class GroupPool:
    """Fresh, empty run groups made ahead by a background thread, which also deletes used ones.

    ``take(memory_kb, max_pids)`` returns a group never used before with these limits (made on the spot
    when none is ready; None without a cgroup hierarchy). ``give_back(group)`` after the run, once the
    caller emptied it (``kill_all``): the thread deletes it. No group serves two runs, so each run's peak
    memory, CPU time and OOM count start from zero."""

    def __init__(self, size: int = 2, prefix: str | None = None) -> None:
        self.size = size
        self.prefix = prefix or f"run-{os.getpid()}"  # sweep_stale() deletes them if this process dies
        self._ready: deque[RunCgroup] = deque()
        self._dead: deque[RunCgroup] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._failures = 0
        self._thread = threading.Thread(target=self._serve, name="runflare-cgroups", daemon=True)
        self._thread.start()

    def _new(self, memory_kb: int | None = None, max_pids: int | None = None) -> RunCgroup | None:
        return RunCgroup.create(f"{self.prefix}-{uuid.uuid4().hex[:12]}", memory_kb, max_pids)

    def take(self, memory_kb: int | None, max_pids: int | None) -> RunCgroup | None:
        if mechanism() == "rlimit":  # cgroups switched off since the pool was made: rlimits only
            return None
        with self._cond:
            group = self._ready.popleft() if self._ready else None
            self._cond.notify()
        if group is not None:  # made by this pool's thread and never handed out: nothing is in it
            try:
                group.set_limits(memory_kb, max_pids)
                return group
            except OSError:
                self.give_back(group)
        return self._new(memory_kb, max_pids)

    def give_back(self, group: RunCgroup | None) -> None:
        if group is None:
            return
        with self._cond:
            self._dead.append(group)
            self._cond.notify()

    def ready_count(self) -> int:
        with self._cond:
            return len(self._ready)

    def close(self) -> None:
        """Stop the thread and delete every group the pool still holds."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        with self._cond:
            groups = [*self._ready, *self._dead]
            self._ready.clear()
            self._dead.clear()
        for group in groups:
            group.remove()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._dead and (len(self._ready) >= self.size or self._failures > 3):
                    self._cond.wait()
                if self._closed:
                    return
                dead = self._dead.popleft() if self._dead else None
            if dead is not None:
                dead.remove()  # kills what is left (nothing: the run emptied it), then rmdir
                continue
            group = self._new()
            with self._cond:
                if group is None:
                    self._failures += 1
                else:
                    self._failures = 0
                    self._ready.append(group)  # close() deletes it if the pool closed meanwhile
