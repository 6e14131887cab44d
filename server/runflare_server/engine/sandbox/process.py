"""The sandbox command for ONE process: bubblewrap, else ``unshare``, else (explicitly) nothing.

``wrap(argv, workdir=..., mode=..., ...)`` returns the argv that runs ``argv`` inside a fresh sandbox:
every namespace unshared (network only when allowed), the system read-only, a private writable work
dir mounted at ``/box``, private ``/tmp``, minimal ``/dev``, own ``/proc``, new session, clean environment,
and the sandbox dies with its parent. Limits (rlimits, cgroup) are applied by the caller's preexec
(see ``cgroups.rlimit_preexec``), and inherited by the sandboxed process.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

from runflare_server.engine.sandbox import policy

log = logging.getLogger(__name__)

MODES = ("auto", "bwrap", "unshare", "none")
BOX = "/box"  # the work dir as the program sees it
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


class SandboxUnavailable(RuntimeError):
    """The requested sandbox mechanism cannot run on this host."""


@functools.cache
def _works(mode: str) -> bool:
    probe = {
        "bwrap": ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--", "true"],
        "unshare": ["unshare", "--pid", "--fork", "--net", "--ipc", "--uts", "--mount", "--", "true"],
    }[mode]
    if not shutil.which(probe[0]):
        return False
    try:
        return subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def resolve_mode(mode: str = "auto") -> str:
    """The concrete mechanism for ``mode``: "bwrap" | "unshare" | "none". Raises if unavailable."""
    if mode not in MODES:
        raise ValueError(f"sandbox mode must be one of {MODES}, not {mode!r}")
    if mode == "none":
        log.warning("SANDBOX DISABLED (--sandbox none): untrusted code runs with the server's rights")
        return "none"
    if mode in ("auto", "bwrap") and _works("bwrap"):
        return "bwrap"
    if mode in ("auto", "bwrap"):
        # unshare alone leaves the host's files visible and writable to a root program: never chosen silently
        raise SandboxUnavailable("bwrap is not installed or cannot create namespaces here: install bubblewrap, "
                                 "or choose sandbox 'unshare' (weak: the host's files stay reachable) or 'none'")
    if _works("unshare"):
        log.warning("SANDBOX WEAK (--sandbox unshare): namespaces only; the host's files stay reachable")
        return "unshare"
    raise SandboxUnavailable("unshare cannot create namespaces here")


def scratch_base() -> Path:
    """A memory-backed dir when there is one: files a run writes there are charged to its memory cgroup, so
    memory_limit also bounds how much it can write in all (max_file_size bounds each file)."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def runs_root() -> Path:
    """Where per-run work dirs are created (``RUNFLARE_RUNS_DIR``, else a private dir on scratch_base())."""
    root = Path(os.environ.get("RUNFLARE_RUNS_DIR") or scratch_base() / f"runflare-runs-{os.getuid()}")
    root.mkdir(mode=0o711, parents=True, exist_ok=True)
    os.chmod(root, 0o711)  # traversable, not listable: each run dir is its own uid's, mode 0700
    return root


def private_runs_mount(size: str = "50%") -> bool:
    """Give this process (a Run-Flare kernel, before it starts any thread) its own mount namespace with a
    fresh tmpfs over ``runs_root()``: sandboxes see their work dir as ``/<random>`` of that tmpfs (no host
    path in their mountinfo), and every run dir vanishes with the kernel, even when it is killed."""
    import ctypes

    if os.geteuid() != 0:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    root = str(runs_root()).encode()
    ms_rec, ms_private, clone_newns = 16384, 1 << 18, 0x20000
    if libc.unshare(clone_newns) != 0 or libc.mount(b"none", b"/", None, ms_rec | ms_private, None) != 0 \
            or libc.mount(b"tmpfs", root, b"tmpfs", 2 | 4, f"size={size},mode=0711".encode()) != 0:
        log.warning("no private runs mount: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


def new_workdir(root: Path | None = None, uid: int | None = None) -> Path:
    """A fresh, empty work dir for one run, owned by the run's sandbox uid (mode 0700)."""
    return policy.owned_dir((root or runs_root()) / uuid.uuid4().hex, uid)


def remove_workdir(path: Path) -> None:
    """Delete a run's work dir (whatever the program left in it)."""
    shutil.rmtree(path, ignore_errors=True)


def sandbox_env(extra: Mapping[str, str] | None = None, path: str = DEFAULT_PATH) -> dict[str, str]:
    """The whole environment a sandboxed program sees: nothing of the server's."""
    env = {"PATH": path, "HOME": BOX, "TMPDIR": "/tmp", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "USER": "runner"}
    env.update(extra or {})
    return env


def wrap(
    argv: list[str],
    *,
    workdir: Path,
    mode: str,
    env: Mapping[str, str],
    network: bool = False,
    ro_paths: Iterable[str] = (),
    uid: int | None = None,
    seccomp_fd: int | None = None,
) -> list[str]:
    """The argv running ``argv`` in a fresh sandbox with cwd ``/box`` (= ``workdir``, read-write).

    ``ro_paths`` are extra host paths (toolchains outside /usr) made visible read-only at the same path.
    ``uid`` is the slot's host uid (see ``policy``), ``seccomp_fd`` an inherited fd with the filter.
    ``mode`` must be concrete (see ``resolve_mode``). With "unshare"/"none" the program's cwd is ``workdir``
    itself and paths in ``argv`` must be host paths; callers use ``box_path`` to stay mode-agnostic.
    """
    if mode == "bwrap":
        if seccomp_fd is None:
            raise ValueError("a bwrap sandbox needs its seccomp filter fd")
        return _bwrap(argv, workdir, env, network, ro_paths, uid, seccomp_fd)
    drop = policy.drop_to(uid) if uid is not None and policy.per_slot_uids() else []
    if mode == "unshare":
        if network:
            raise SandboxUnavailable("enable_network needs the bwrap sandbox (and pasta)")
        # the weak mode never shares the host's network
        cmd = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--ipc", "--uts", "--mount", "--net"]
        return [*cmd, "--", *drop, "env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv]
    if mode == "none":
        return ["env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv]
    raise ValueError(f"not a concrete sandbox mode: {mode!r}")


def box_path(mode: str, workdir: Path) -> str:
    """The work dir's path as the sandboxed program sees it."""
    return BOX if mode == "bwrap" else str(workdir)


def _bwrap(argv: list[str], workdir: Path, env: Mapping[str, str], network: bool,
           ro_paths: Iterable[str], uid: int | None, seccomp_fd: int) -> list[str]:
    ro = [p for p in ro_paths if os.path.exists(p)]
    if not network:
        return policy.bwrap_command(argv, uid=uid, binds=["--bind", str(workdir), BOX], env=env, ro_paths=ro,
                                    chdir=BOX, seccomp_fd=seccomp_fd)
    from runflare_server.engine.sandbox import network as usernet

    if not usernet.available():
        raise SandboxUnavailable(f"enable_network needs pasta: {usernet.describe().get('reason')}")
    if uid is None or not policy.per_slot_uids():  # an unprivileged server: it is the sandbox's user itself
        return usernet.wrap(policy.bwrap_command(argv, uid=None, binds=["--bind", str(workdir), BOX], env=env,
                                                 network=True, ro_paths=ro, chdir=BOX, seccomp_fd=seccomp_fd))
    # bubblewrap starts as the slot uid here: what it binds is reached through the launcher's view
    private = [p for p in ro if p not in policy.SYSTEM_DIRS]
    view = str(policy.VIEW_DIR)
    cmd = policy.bwrap_command(argv, uid=uid, binds=["--bind", f"{view}/0", BOX], env=env, network=True,
                               ro_paths=ro, chdir=BOX, seccomp_fd=seccomp_fd, started_by_slot_uid=True,
                               source_of={p: f"{view}/{n}" for n, p in enumerate(private, 1)})
    return policy.network_launch(usernet.wrap(cmd), uid=uid, view_sources=[f"rw:{workdir}", *private])
