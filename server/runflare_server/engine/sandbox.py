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

log = logging.getLogger(__name__)

MODES = ("auto", "bwrap", "unshare", "none")
BOX = "/box"  # the work dir as the program sees it
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# Files under /etc a program must not read: masked with an empty file.
SECRET_FILES = ("/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-", "/etc/sudoers")
SECRET_DIRS = ("/etc/ssh", "/etc/ssl/private", "/etc/sudoers.d", "/etc/runflare")
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
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return root


def new_workdir(root: Path | None = None) -> Path:
    """A fresh, empty work dir for one run."""
    d = (root or runs_root()) / uuid.uuid4().hex
    d.mkdir(mode=0o755)
    return d


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
    pass_fds: Iterable[int] = (),
) -> list[str]:
    """The argv running ``argv`` in a fresh sandbox with cwd ``/box`` (= ``workdir``, read-write).

    ``ro_paths`` are extra host paths (toolchains outside /usr) made visible read-only at the same path.
    ``mode`` must be concrete (see ``resolve_mode``). With "unshare"/"none" the program's cwd is ``workdir``
    itself and paths in ``argv`` must be host paths; callers use ``box_path`` to stay mode-agnostic.
    """
    if mode == "bwrap":
        return _bwrap(argv, workdir, env, network, ro_paths, pass_fds)
    if mode == "unshare":
        cmd = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--ipc", "--uts", "--mount"]
        if not network:
            cmd.append("--net")
        return [*cmd, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv]
    if mode == "none":
        return ["env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv]
    raise ValueError(f"not a concrete sandbox mode: {mode!r}")


def secret_masks() -> list[str]:
    """bwrap arguments hiding the host's secrets under the read-only /etc (programs and kernels alike)."""
    args: list[str] = []
    for f in SECRET_FILES:
        if os.path.isfile(f):
            args += ["--ro-bind", "/dev/null", f]
    for d in SECRET_DIRS:
        if os.path.isdir(d):
            args += ["--tmpfs", d, "--remount-ro", d]
    return args


def box_path(mode: str, workdir: Path) -> str:
    """The work dir's path as the sandboxed program sees it."""
    return BOX if mode == "bwrap" else str(workdir)


def _bwrap(argv: list[str], workdir: Path, env: Mapping[str, str], network: bool,
           ro_paths: Iterable[str], pass_fds: Iterable[int]) -> list[str]:
    cmd = ["bwrap", "--unshare-all"]
    if network:
        cmd.append("--share-net")
    cmd += ["--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv"]
    cmd += ["--tmpfs", "/tmp", "--tmpfs", "/run"]  # first, so binds below them (a venv, resolv.conf) stay
    for d in SYSTEM_DIRS:
        if os.path.lexists(d):
            # /bin, /lib... are symlinks into /usr on merged-usr systems: keep them symlinks.
            if os.path.islink(d):
                cmd += ["--symlink", os.readlink(d), d]
            else:
                cmd += ["--ro-bind", d, d]
    if network:
        for f in ("/etc/resolv.conf", "/run/systemd/resolve"):
            real = os.path.realpath(f)
            if real != f and os.path.exists(real) and not real.startswith("/etc/"):
                cmd += ["--ro-bind", real, real]
    cmd += secret_masks()
    for p in sorted(set(ro_paths)):
        if os.path.exists(p) and not any(p == s or p.startswith(s + "/") for s in SYSTEM_DIRS if not os.path.islink(s)):
            cmd += ["--ro-bind", p, p]
    cmd += ["--proc", "/proc", "--dev", "/dev",
            "--bind", str(workdir), BOX, "--chdir", BOX]
    for k, v in env.items():
        cmd += ["--setenv", k, v]
    del pass_fds  # bwrap passes inherited fds through unchanged
    return [*cmd, "--", *argv]
