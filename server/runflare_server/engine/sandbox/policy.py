"""The one sandbox policy: who untrusted code runs as, what it sees, which system calls it may make.

Every sandboxed process (a program run, its compile step, a whole kernel, the fork server and each kernel
it forks) gets its view from this module, so no second copy can drift weaker than the first:

- **Identity.** Never host root. As root, bubblewrap builds the view without a user namespace (a namespace
  mapping 0 to host 0 still passes every "is global root" check, such as writing kernel.core_pattern) and
  the sandboxed process drops to an unprivileged host uid/gid leased for its slot (isolate's model: a uid
  per box), with no capabilities and no_new_privs. Run as an ordinary user, bubblewrap makes an
  unprivileged user namespace instead, and the sandbox runs as that user.
- **/proc and /sys** as runc leaves them: ``READONLY_PROC`` read-only, ``MASKED_PROC`` hidden, no /sys.
- **System calls**: the seccomp filter of ``seccomp.py`` on every process.
- **The system**: read-only, host secrets masked, a private /tmp.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import grp
import logging
import os
import pwd
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from runflare_server.engine.sandbox import seccomp

log = logging.getLogger(__name__)
SERVER_DIR = str(Path(__file__).resolve().parents[2])  # .../server: what imports runflare_server

UIDS_ENV = "RUNFLARE_SANDBOX_UIDS"  # "BASE:COUNT", the same name as the server setting sandbox_uids
DEFAULT_UIDS = "1900000000:65536"  # far above real accounts (and above the usual /etc/subuid ranges)
LEASE_DIR = Path("/run/runflare/uids")
VIEW_DIR = Path("/run/runflare/view")  # an empty mount point for userns_launcher's private view
SETPRIV = "/usr/bin/setpriv"

# runc's defaults (libcontainer/specconv): /proc entries made read-only, and entries hidden.
READONLY_PROC = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
MASKED_PROC = ("/proc/acpi", "/proc/asound", "/proc/interrupts", "/proc/kcore", "/proc/keys",
               "/proc/latency_stats", "/proc/sched_debug", "/proc/scsi", "/proc/timer_list",
               "/proc/timer_stats")

SYSTEM_DIRS = ("/usr", "/etc", "/opt", "/var/lib/dpkg/alternatives")
SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SECRET_FILES = ("/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-", "/etc/sudoers")
SECRET_DIRS = ("/etc/ssh", "/etc/ssl/private", "/etc/sudoers.d", "/etc/runflare")


class SandboxConfigError(RuntimeError):
    """The sandbox cannot be set up as configured (said in words an operator can act on)."""


# ---------------------------------------------------------------- identity


@dataclass(frozen=True)
class UidRange:
    """The host uids (and gids, same numbers) reserved for sandboxes."""

    base: int
    count: int

    @classmethod
    def from_env(cls) -> UidRange:
        text = os.environ.get(UIDS_ENV) or DEFAULT_UIDS
        try:
            base, count = (int(x) for x in text.split(":"))
        except ValueError:
            raise SandboxConfigError(f"{UIDS_ENV}={text!r}: expected BASE:COUNT, e.g. {DEFAULT_UIDS}") from None
        return cls(base, count)

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self.base <= uid < self.base + self.count

    def check(self) -> None:
        """Raise SandboxConfigError unless the range is usable: large enough, below the overflow ids, and
        shared with no account, group or /etc/subuid range on this host."""
        if self.base < 1000 or self.count < 16 or self.base + self.count > 0xFFFF_FFFE:
            raise SandboxConfigError(f"sandbox uid range {self.base}:{self.count} must lie within 1000..4294967294 "
                                     "and hold at least 16 ids")
        users = [p.pw_name for p in pwd.getpwall() if p.pw_uid in self]
        groups = [g.gr_name for g in grp.getgrall() if g.gr_gid in self]
        if users or groups:
            raise SandboxConfigError(f"sandbox uid range {self.base}:{self.count} holds existing accounts "
                                     f"{users + groups}: choose another with {UIDS_ENV}")
        for f in ("/etc/subuid", "/etc/subgid"):
            for line in _lines(f):
                parts = line.split(":")
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                    start, n = int(parts[1]), int(parts[2])
                    if start < self.base + self.count and self.base < start + n:
                        raise SandboxConfigError(f"sandbox uid range {self.base}:{self.count} overlaps {f} entry "
                                                 f"{line!r}: choose another with {UIDS_ENV}")


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().split()
    except OSError:
        return []


def per_slot_uids() -> bool:
    """Whether sandboxes get their own host uid (the server runs as root) or run as the server's user."""
    return os.geteuid() == 0


class UidLease:
    """Host uids held for one slot (or a block, for the fork server), until ``release()`` or process exit.

    Leases are ``flock``s on files in a root-only dir, so every process on the host (servers, workers,
    Run-Flare kernels started from JupyterLab) shares one allocation, and a killed holder frees its uids.
    """

    def __init__(self, first: int, count: int, fds: list[int]) -> None:
        self.first = first
        self.count = count
        self._fds = fds

    @classmethod
    def acquire(cls, count: int = 1, uids: UidRange | None = None) -> UidLease:
        """Lease ``count`` consecutive free uids; raises SandboxConfigError when the range is exhausted."""
        uids = uids or UidRange.from_env()
        LEASE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(LEASE_DIR.parent, 0o755)
        os.chmod(LEASE_DIR, 0o700)
        for first in range(uids.base, uids.base + uids.count - count + 1, count):
            fds: list[int] = []
            for uid in range(first, first + count):
                fd = os.open(LEASE_DIR / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    break
                fds.append(fd)
            if len(fds) == count:
                return cls(first, count, fds)
            for fd in fds:
                os.close(fd)
        raise SandboxConfigError(f"no {count} free sandbox uids left in {uids.base}:{uids.count}")

    @property
    def uid(self) -> int:
        return self.first

    def release(self) -> None:
        """Give the uids back (only once nothing runs as them any more)."""
        fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def owned_dir(path: Path, uid: int | None, mode: int = 0o700) -> Path:
    """Make ``path`` belong to the sandbox uid (mode 0700), so only its own slot can use it."""
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    if uid is not None and per_slot_uids():
        os.chown(path, uid, uid)
    os.chmod(path, mode)
    return path


def drop_to(uid: int) -> list[str]:
    """The argv prefix that turns bubblewrap's root into ``uid`` with no capabilities, no groups and
    no_new_privs, right before the sandboxed program runs."""
    return [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs", "--"]


# ---------------------------------------------------------------- the view


@functools.cache
def proc_view() -> tuple[str, ...]:
    """bwrap arguments: a fresh /proc with runc's read-only and masked paths (those present here)."""
    args = ["--proc", "/proc"]
    for p in READONLY_PROC:
        if os.path.exists(p):
            args += ["--ro-bind", p, p]
    for p in MASKED_PROC:
        if os.path.isdir(p):
            args += ["--perms", "0555", "--tmpfs", p, "--remount-ro", p]
        elif os.path.exists(p):
            args += ["--ro-bind", "/dev/null", p]
    return tuple(args)


@functools.cache
def secret_masks() -> tuple[str, ...]:
    """bwrap arguments hiding the host's secrets under the read-only /etc."""
    args: list[str] = []
    for f in SECRET_FILES:
        if os.path.isfile(f):
            args += ["--ro-bind", "/dev/null", f]
    for d in SECRET_DIRS:
        if os.path.isdir(d):
            args += ["--tmpfs", d, "--remount-ro", d]
    return tuple(args)


def _parents(path: str, made: set[str]) -> list[str]:
    """``--dir`` for each missing ancestor of a bind target, mode 0755, so a tree bound from below a
    private host dir (a Python under /root) is reachable by the sandbox uid; the host's dir is not bound."""
    args: list[str] = []
    parts = Path(path).parts[1:-1]
    for i in range(1, len(parts) + 1):
        d = "/" + "/".join(parts[:i])
        if d not in made:
            made.add(d)
            args += ["--perms", "0755", "--dir", d]
    return args


def system_view(ro_paths: Iterable[str] = (), source_of: Mapping[str, str] | None = None) -> list[str]:
    """bwrap arguments for what a sandbox sees of the host: a private /tmp and /run (first, so a tree
    under them can still be bound), the system trees and ``ro_paths`` read-only, secrets masked,
    merged-/usr links. Nothing else of the host: no /sys, no /home, no /root, no /var.
    ``source_of`` maps a path to where bubblewrap finds it, when that is not the path itself."""
    args = ["--perms", "1777", "--tmpfs", "/tmp", "--tmpfs", "/run"]
    made: set[str] = {"/tmp", "/run"}
    paths = [p for p in SYSTEM_DIRS if os.path.exists(p)]
    for extra in ro_paths:
        if extra and os.path.exists(extra) and not any(_under(extra, p) for p in paths):
            paths = [p for p in paths if not _under(p, extra)] + [os.path.realpath(extra)]
    for p in sorted(set(paths)):
        args += _parents(p, made) + ["--ro-bind", (source_of or {}).get(p, p), p]
    args += secret_masks()
    for link in SYSTEM_LINKS:
        if os.path.islink(link):
            args += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            args += ["--ro-bind", link, link]
    return args


def _under(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def namespaces(network: bool, privileged: bool) -> list[str]:
    """bwrap's namespace flags: everything but the user namespace when started as root (identity is the
    slot uid, set by ``drop_to``), everything when started unprivileged. ``network`` keeps the network
    namespace bwrap starts in, which ``network.wrap`` makes a user-mode one: never the host's."""
    if privileged:
        if network:
            raise ValueError("a network sandbox starts unprivileged, inside network.wrap (never the host's)")
        return ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--unshare-net"]
    return ["--unshare-all"] + (["--share-net"] if network else [])


def capabilities(privileged: bool) -> list[str]:
    """bwrap's capability flags: as root, only what ``drop_to`` needs to change uid (and then drops all),
    and DAC_OVERRIDE for bwrap's own ``--chdir`` into the slot's 0700 work dir."""
    if privileged:
        return ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
                "--cap-add", "CAP_SETPCAP", "--cap-add", "CAP_DAC_OVERRIDE"]
    return ["--cap-drop", "ALL"]


def bwrap_command(argv: list[str], *, uid: int | None, binds: list[str], env: Mapping[str, str],
                  network: bool = False, ro_paths: Iterable[str] = (), chdir: str,
                  seccomp_fd: int, started_by_slot_uid: bool = False,
                  source_of: Mapping[str, str] | None = None) -> list[str]:
    """The whole bubblewrap command line for one sandboxed process tree.

    ``binds`` are the caller's own mounts (its work dir, its connection dir), ``seccomp_fd`` an
    inherited fd holding the filter (``seccomp.bpf_fd()``), ``uid`` the slot's uid (when root).
    With ``network`` the command is meant for ``network.wrap``: bubblewrap then starts as the slot uid
    (see ``network_launch``) in the user-mode network namespace, with its own unprivileged user namespace.
    """
    if network and per_slot_uids() and not started_by_slot_uid:
        # as root, bwrap --unshare-all would map the sandbox's 0 to host 0 in the host's network: never
        raise ValueError("a network sandbox must be started by the slot uid, inside network.wrap")
    privileged = per_slot_uids() and not network
    cmd = ["bwrap", *namespaces(network, privileged), "--die-with-parent", "--new-session", "--clearenv",
           *capabilities(privileged), *system_view(ro_paths, source_of), *proc_view(), "--dev", "/dev",
           "--perms", "1777", "--tmpfs", "/dev/shm", *binds,
           "--chdir", chdir, "--seccomp", str(seccomp_fd)]
    for k, v in env.items():
        cmd += ["--setenv", k, v]
    if network:
        from runflare_server.engine.sandbox import network as usernet

        cmd += ["--ro-bind", usernet.resolv_conf_path(), "/etc/resolv.conf"]
    prefix = drop_to(uid) if uid is not None and privileged else []
    return [*cmd, "--", *prefix, *argv]


def network_launch(argv: list[str], *, uid: int, view_sources: list[str]) -> list[str]:
    """Run ``argv`` (``network.wrap`` around an unprivileged bubblewrap) as ``uid``, started by root
    through ``userns_launcher``: it binds ``view_sources`` under ``VIEW_DIR/<n>`` (``rw:`` for writable),
    where the slot uid can reach them whatever their host parents, then becomes ``uid``."""
    VIEW_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    return [sys.executable, "-m", "runflare_server.engine.sandbox.userns_launcher", str(VIEW_DIR), ",".join(view_sources),
            "--become", str(uid), "--", *argv]


def launcher_env() -> dict[str, str]:
    """The environment of ``userns_launcher`` (outside every sandbox): a PATH and the server's code."""
    return {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "PYTHONPATH": SERVER_DIR}


def check(mode: str = "auto") -> dict[str, object]:
    """Check this host can apply the policy; raise SandboxConfigError saying what is wrong."""
    if mode in ("auto", "bwrap") and not shutil.which("bwrap"):
        raise SandboxConfigError("bubblewrap is not installed (apt-get install bubblewrap)")
    try:
        seccomp.bpf()
    except (ImportError, OSError) as e:
        raise SandboxConfigError(f"cannot build the seccomp filter (pip install pyseccomp; apt-get install "
                                 f"libseccomp2): {e}") from e
    info: dict[str, object] = {"identity": "per-slot uids" if per_slot_uids() else "user namespace",
                               "seccomp": f"{len(seccomp.DENIED) + len(seccomp.ENOSYS_CALLS)} calls denied"}
    if per_slot_uids():
        uids = UidRange.from_env()
        uids.check()
        if not os.access(SETPRIV, os.X_OK):
            raise SandboxConfigError(f"{SETPRIV} is missing (apt-get install util-linux)")
        info["uids"] = f"{uids.base}:{uids.count}"
    return info
