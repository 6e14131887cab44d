"""Sandbox a whole Jupyter kernel: bubblewrap (or unshare) around a kernelspec's argv.

Inside the sandbox the kernel sees a read-only system, a private tmpfs work dir (``/sandbox``,
its cwd and HOME, gone with the sandbox), its connection dir (``/run/kernel``, the only host
dir bound writable: ipc socket files live there), a fresh /tmp, /proc and /dev, no network
(unless asked), its own PID/IPC/UTS namespaces, a new session, a clean environment and no
capabilities. Kernels that only speak TCP (Deno) run behind a small ipc<->tcp bridge inside their
sandbox (``tcp_bridge``); ipykernel can instead be forked from a fork server (``zygote``) that sets up the
same isolation per kernel with unshare/mount. Both are programs run inside the sandbox from their source
text (``program_source``), never imported there.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.util
import json
import logging
import os
import resource
import shlex
import shutil
import signal
import site
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil

from runflare_server.engine.jupyter.adapters import adapter_for
from runflare_server.engine.sandbox import cgroups, policy, seccomp

log = logging.getLogger(__name__)

SANDBOX_WORK = "/sandbox"
SANDBOX_CONN = "/run/kernel"
MODES = ("bwrap", "unshare", "none", "auto")

# System trees bound read-only when present (the host's root file system is never bound whole).
WORK_TMPFS_BYTES = 256 << 20


def _probe(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def detect_mode(requested: str = "auto") -> str:
    """The sandbox mechanism to use: "bwrap", "unshare", "none" or "unavailable".

    "auto" is bubblewrap only: the weak "unshare" and "none" are never picked silently.
    """
    if requested not in MODES:
        raise ValueError(f"unknown sandbox mode {requested!r}; choose one of {MODES}")
    if requested == "none":
        log.warning("kernel runs: sandbox DISABLED (--sandbox none): user code runs with the server's rights")
        return "none"
    if requested in ("auto", "bwrap") and shutil.which("bwrap"):
        if _probe(["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--proc", "/proc",
                   "--dev", "/dev", "true"]):
            return "bwrap"
        log.warning("bwrap is installed but cannot create namespaces here")
    if requested == "unshare" and shutil.which("unshare") and _probe(
            ["unshare", "--net", "--pid", "--fork", "--mount", "--ipc", "--uts", "true"]):
        return "unshare"
    return "unavailable"


def resolve_argv(argv: list[str]) -> list[str]:
    """A kernelspec argv with its program made absolute ("python" is this interpreter, as in jupyter_client)."""
    argv = list(argv)
    if argv and argv[0] in {"python", f"python{sys.version_info[0]}", "python%i.%i" % sys.version_info[:2]}:
        argv[0] = sys.executable
    elif argv and not os.path.isabs(argv[0]):
        argv[0] = shutil.which(argv[0]) or argv[0]
    return argv


def readonly_paths(argv: list[str], extra: Iterable[str] = ()) -> list[str]:
    """Host paths the kernel needs to read: system trees, Python prefixes, the kernel program's tree."""
    paths: list[str] = [p for p in policy.SYSTEM_DIRS if os.path.exists(p)]
    candidates = [sys.prefix, sys.base_prefix, sys.exec_prefix, site.getusersitepackages(), *extra]
    if argv and os.path.isabs(argv[0]):
        real = os.path.realpath(argv[0])
        candidates += [os.path.dirname(os.path.dirname(real))]
    for c in candidates:
        if c and os.path.exists(c) and not any(_under(c, p) for p in paths):
            paths = [p for p in paths if not _under(p, c)] + [os.path.realpath(c)]
    return sorted(set(paths))


def _under(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def clean_env(extra: dict[str, str] | None = None, argv0: str | None = None) -> dict[str, str]:
    """The whole environment a sandboxed kernel gets (nothing inherited from the server)."""
    bindirs = [os.path.dirname(sys.executable)]
    if argv0 and os.path.isabs(argv0):
        bindirs.append(os.path.dirname(argv0))
    path = ":".join(dict.fromkeys([*bindirs, "/usr/local/bin", "/usr/bin", "/bin"]))
    env = {
        "PATH": path,
        "HOME": SANDBOX_WORK,
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "IPYTHONDIR": SANDBOX_WORK + "/.ipython",
        "MPLCONFIGDIR": "/tmp/matplotlib",
        "DENO_DIR": SANDBOX_WORK + "/.deno",
        "DENO_NO_UPDATE_CHECK": "1",
        "NO_COLOR": "1",
        "TERM": "dumb",
    }
    env.update(extra or {})
    env.pop("JPY_PARENT_PID", None)  # ipykernel exits at once in a PID namespace otherwise
    return env


def bwrap_argv(argv: list[str], conn_dir: Path, *, network: bool, env: dict[str, str],
               ro_extra: Iterable[str] = (), uid: int | None = None, seccomp_fd: int | str) -> list[str]:
    """bubblewrap command line running ``argv`` (already rewritten for in-sandbox paths) as ``uid``, with
    the policy's whole view plus a private work tmpfs and the kernel's connection dir."""
    binds = ["--perms", "1777", "--size", str(WORK_TMPFS_BYTES), "--tmpfs", SANDBOX_WORK,
             "--bind", str(conn_dir), SANDBOX_CONN]
    return policy.bwrap_command(argv, uid=uid, binds=binds, env=env, network=network,
                                ro_paths=readonly_paths(argv, ro_extra), chdir=SANDBOX_WORK, seccomp_fd=seccomp_fd)


def network_argv(argv: list[str], conn_dir: Path, *, env: dict[str, str], ro_extra: Iterable[str] = (),
                 uid: int, seccomp_fd: int) -> list[str]:
    """A kernel with ``enable_network``: ``userns_launcher`` binds the trees the kernel needs (and its
    connection dir) where the slot uid can reach them, becomes that uid, and starts pasta
    (``network.wrap``) around an unprivileged bubblewrap with the same view as ``bwrap_argv``."""
    from runflare_server.engine.sandbox import network as usernet

    if not usernet.available():
        raise RuntimeError(f"enable_network needs pasta here: {usernet.describe().get('reason')}")
    ro = readonly_paths(argv, ro_extra)
    private = [p for p in ro if p not in policy.SYSTEM_DIRS] + [str(conn_dir)]
    view = str(policy.VIEW_DIR)
    source_of = {p: f"{view}/{n}" for n, p in enumerate(private)}
    binds = ["--perms", "1777", "--size", str(WORK_TMPFS_BYTES), "--tmpfs", SANDBOX_WORK,
             "--bind", source_of[str(conn_dir)], SANDBOX_CONN]
    cmd = policy.bwrap_command(argv, uid=uid, binds=binds, env=env, network=True, ro_paths=ro, chdir=SANDBOX_WORK,
                               seccomp_fd=seccomp_fd, started_by_slot_uid=True, source_of=source_of)
    sources = [f"rw:{p}" if p == str(conn_dir) else p for p in private]
    return policy.network_launch(usernet.wrap(cmd), uid=uid, view_sources=sources)


def _private_ancestor(path: str) -> str | None:
    """The top-most dir above ``path`` that other users cannot traverse (``/root``), if any."""
    parts = Path(path).parts
    for i in range(2, len(parts)):
        d = str(Path(*parts[:i]))
        with contextlib.suppress(OSError):
            if not os.stat(d).st_mode & 0o001:
                return d
    return None


def _reachable_script(paths: Iterable[str], cover_private: bool = True) -> str:
    """Shell lines (run as root in the sandbox's mount namespace) for a private ``/tmp`` that keeps the
    trees the kernel needs: each tree below ``/tmp`` (a venv) or, with ``cover_private``, below a dir the
    slot uid cannot traverse (``/root``) is bound aside, a fresh tmpfs covers ``/tmp`` and each private
    ancestor (hiding the rest of it), and the tree is bound back at its own path. Nothing on the host
    changes."""
    trees = [(p, a) for p in paths if p not in policy.SYSTEM_DIRS
             and (a := "/tmp" if _under(p, "/tmp") else _private_ancestor(p) if cover_private else None)]
    if not trees:
        return "mount -t tmpfs tmpfs /tmp; "
    view = shlex.quote(str(policy.VIEW_DIR))
    lines = [f"mkdir -p {view}; mount -t tmpfs -o mode=0755 tmpfs {view}; "]
    for n, (p, _) in enumerate(trees):
        lines.append(f"mkdir {view}/{n}; mount --rbind {shlex.quote(p)} {view}/{n}; ")
    lines.append("mount -t tmpfs tmpfs /tmp; ")
    for a in sorted({a for _, a in trees} - {"/tmp"}):
        lines.append(f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(a)}; ")
    for n, (p, _) in enumerate(trees):
        lines.append(f"mkdir -p {shlex.quote(p)}; mount --rbind {view}/{n} {shlex.quote(p)}; ")
    return "".join(lines)


def unshare_argv(argv: list[str], conn_dir: Path, *, env: dict[str, str],
                 uid: int | None = None) -> list[str]:
    """Fallback when bubblewrap is missing: new namespaces, tmpfs over /tmp and the work dir.

    Weaker than bwrap: the host file system stays visible (read-only remount of / is attempted).
    """
    drop = shlex.join(policy.drop_to(uid)) if uid is not None and policy.per_slot_uids() else ""
    script = (
        "set -e; mount --make-rprivate /; "
        f"mkdir -p {SANDBOX_WORK} {SANDBOX_CONN} 2>/dev/null || true; "
        f"mount -t tmpfs -o size={WORK_TMPFS_BYTES} tmpfs {SANDBOX_WORK}; "
        f"mount --bind {conn_dir} {SANDBOX_CONN}; "
        f"mount -t tmpfs -o ro tmpfs {conn_dir.parent}; "  # other kernels' connection dirs
        + _reachable_script(readonly_paths(argv), cover_private=bool(drop)) +
        "mount -o remount,bind,ro / 2>/dev/null || true; "
        f'cd {SANDBOX_WORK}; exec {drop} env -i "$@"'
    )
    ns = ["--pid", "--fork", "--mount-proc", "--mount", "--ipc", "--uts", "--kill-child", "--net"]  # never the host's
    envs = [f"{k}={v}" for k, v in env.items()]
    return ["unshare", *ns, "--", "sh", "-c", script, "sandbox", *envs, *argv]


def spawn(cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """Start a sandbox process in its own session. Call from the event loop thread:
    bwrap's --die-with-parent fires when the spawning *thread* exits."""
    with open(log_path, "ab") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True, cwd=cwd, pass_fds=pass_fds,
                                env=env if env is not None else {"PATH": os.environ.get("PATH", "/usr/bin:/bin")})


def tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants, parents before children (empty if it is gone). Read from each
    process's own ``/proc/PID/task/TID/children``: a few small reads for a kernel's tree, where psutil's
    ``children()`` reads the stat file of every process on the host (milliseconds, several times a run)."""
    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return []
    if not _children_files():
        try:
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []
    procs, todo, seen = [root], collections.deque([pid]), {pid}
    while todo:
        for child in _children_of(todo.popleft()):
            if child in seen:
                continue
            seen.add(child)
            try:
                procs.append(psutil.Process(child))
            except psutil.Error:
                continue
            todo.append(child)
    return procs


def child_pids(pid: int) -> set[int]:
    """The pids of a process's direct children (read like ``tree``; empty once it is gone)."""
    if _children_files():
        return set(_children_of(pid))
    try:
        return {c.pid for c in psutil.Process(pid).children()}
    except psutil.Error:
        return set()


def exited(pid: int) -> bool:
    """Whether the process has exited (no longer there, or a zombie): one read of its stat file."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except OSError:
        return True
    return stat_line[stat_line.rfind(b")") + 2:][:1] in (b"Z", b"X", b"")


def ns_pids(pid: int) -> list[int]:
    """A process's pid in each pid namespace it is in, outermost (the host's) first; [] once it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"NSpid:"):
                    return [int(n) for n in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return []


@functools.cache
def _children_files() -> bool:
    """Whether this kernel has /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN) and we may read them."""
    try:
        with open(f"/proc/self/task/{os.getpid()}/children", "rb"):
            return True
    except OSError:
        return False


def _children_of(pid: int) -> list[int]:
    """The pids of a process's children, forked from any of its threads (none once it is gone)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    kids: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                kids.extend(int(k) for k in f.read().split())
        except OSError:  # the thread ended meanwhile
            continue
    return kids


def tree_cpu_seconds(procs: list[psutil.Process]) -> float:
    """User+system CPU of these processes, waited-for children included."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def tree_rss_kb(procs: list[psutil.Process]) -> int:
    """Sum of resident memory of these processes, in KB."""
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total // 1024


def kill_tree(proc: subprocess.Popen, extra: Iterable[psutil.Process] = ()) -> None:
    """SIGKILL the sandbox: descendants first (so bwrap reaps its namespace), then bwrap, then reap."""
    procs = tree(proc.pid)
    for p in [*procs[1:], *extra]:
        try:
            p.kill()
        except psutil.Error:
            pass
    try:
        proc.wait(timeout=1)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.kill()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("sandbox %s did not die", proc.pid)
    psutil.wait_procs(procs[1:], timeout=1)


def set_rlimits(procs: list[psutil.Process], limits: Any) -> None:
    """A run's rlimits on already running processes (inherited by what they start next):
    file size, stack for new processes, no core dumps."""
    values = {resource.RLIMIT_FSIZE: limits.max_file_size * 1024, resource.RLIMIT_CORE: 0}
    if cgroups.mechanism() == "rlimit":  # per uid: each kernel has its own, so this is the kernel's count
        values[resource.RLIMIT_NPROC] = limits.max_processes_and_or_threads
    if limits.stack_limit > 0:
        values[resource.RLIMIT_STACK] = limits.stack_limit * 1024
    apply_rlimits(procs, {res: (v, v) for res, v in values.items()}, strict=False)


def apply_rlimits(procs: list[psutil.Process], values: dict[int, tuple[int, int]], *, strict: bool) -> None:
    """Set these rlimits on each process still running. Whether its pid was reused is checked once per
    process (psutil's ``rlimit`` checks it again for each limit, a read of its stat file each time). With
    ``strict`` a refused limit raises, else it is skipped."""
    for p in procs:
        try:
            if not p.is_running():
                continue
        except psutil.Error:
            continue
        for res, value in values.items():
            try:
                resource.prlimit(p.pid, res, value)
            except (OSError, ValueError):
                if strict:
                    raise


def describe(mode: str) -> dict[str, Any]:
    """Health summary of the sandbox in force."""
    return {"mode": mode, "bwrap": shutil.which("bwrap") is not None, "unshare": shutil.which("unshare") is not None}


def create_cgroup(name: str, memory_kb: int | None, max_pids: int | None) -> cgroups.RunCgroup | None:
    """A per-run cgroup with these limits, or None where no hierarchy is writable."""
    return cgroups.RunCgroup.create(name, memory_kb, max_pids)


def cgroup_mechanism() -> str:
    """Which limit mechanism per-run cgroups use here ("cgroup-v1", "cgroup-v2" or "rlimit")."""
    return cgroups.mechanism()


@functools.cache
def program_source(name: str) -> str:
    """The source text of an engine module that runs as a program inside a sandbox (``"zygote"``,
    ``"tcp_bridge"``), read from its file on the host (it is not imported here). It is passed as
    ``python -c``, so that the server's own tree is never bound into a sandbox."""
    spec = importlib.util.find_spec(f"{__package__}.{name}")
    path = Path(spec.origin if spec and spec.origin else name)
    if path.suffix != ".py" or not path.is_file():
        raise RuntimeError(f"{name}: no source file to run in the sandbox ({path})")
    return path.read_text()


def needs_bridge(argv: list[str]) -> bool:
    """Whether this kernel cannot use the ipc transport (so runs behind the in-sandbox bridge)."""
    return adapter_for(argv).tcp_only


def bridged(argv: list[str], conn_file: str, tcp_conn_file: str) -> list[str]:
    """``argv`` (with ``{connection_file}`` already replaced by ``tcp_conn_file``) behind the bridge."""
    return [sys.executable, "-c", program_source("tcp_bridge"), conn_file, tcp_conn_file, "--", *argv]


def forkable(argv: list[str]) -> bool:
    """Whether a kernelspec can be served by the ipykernel fork server (same interpreter)."""
    return adapter_for(argv).forkable


def zygote_argv(runtime_dir: Path, env: dict[str, str]) -> list[str]:
    """The fork server's command line: ``userns_launcher`` (a user namespace the server maps onto the
    leased uid block, trees below private host dirs bound where those uids can reach them) running
    bubblewrap as that namespace's root, with the policy's system view and a plain /proc (a fresh /proc can
    be mounted inside a user namespace only while one is fully visible: each kernel masks its own)."""
    extra = [p for p in readonly_paths([sys.executable]) if p not in policy.SYSTEM_DIRS]
    view = str(policy.VIEW_DIR)
    sources = ",".join([*extra, f"rw:{runtime_dir}"])  # the runtime dir may sit below a private dir too
    cmd = [sys.executable, "-m", "runflare_server.engine.sandbox.userns_launcher", view, sources, "--"]
    cmd += ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--clearenv", "--cap-drop", "ALL"]
    for cap in ("CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_DAC_OVERRIDE"):
        cmd += ["--cap-add", cap]  # capabilities of the zygote's own user namespace, never of the host's
    cmd += policy.system_view(extra, source_of={p: f"{view}/{n}" for n, p in enumerate(extra)})
    cmd += ["--proc", "/proc", "--dev", "/dev", "--dir", SANDBOX_WORK, "--dir", SANDBOX_CONN,
            "--bind", f"{view}/{len(extra)}", "/run/kernels"]
    for k, v in env.items():
        cmd += ["--setenv", k, v]
    view = {"bpf": seccomp.bpf().hex(), "readonly": list(policy.READONLY_PROC), "masked": list(policy.MASKED_PROC),
            "under_tmp": [p for p in extra if _under(p, "/tmp")]}
    return [*cmd, "--", sys.executable, "-c", program_source("zygote"), str(WORK_TMPFS_BYTES), json.dumps(view)]
