"""Private scratch dirs that name their creator, and the sweep that removes what a dead creator left.

Run dirs (a submission's source and output), kernel runtime dirs (connection files, ipc sockets, status
files) and the program-run kernels' ipc dirs are all made by ``private_dir(kind, base)``:
``<base>/runflare-<kind>-<pid>-<start>-<boot>-<random>``, mode 0700, where ``pid`` is the creating process,
``start`` its start time (clock ticks after boot, field 22 of ``/proc/<pid>/stat``) and ``boot`` the first
8 hex digits of this boot's id. A process removes its own dirs when it stops; a server killed with
SIGKILL cannot, so ``sweep_stale()`` runs when an engine starts (next to ``cgroups.sweep_stale``) and
removes every such dir whose creator is gone: no process with that pid, a zombie, a process with that pid
but another start time (the pid was reused), or a dir from an earlier boot (``/tmp`` may survive one).
Dirs of live creators (another server of the same user, this process) are never touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

_NAME = re.compile(r"^runflare-(?P<kind>[a-z0-9]+)-(?P<pid>\d+)-(?P<start>\d+)-(?P<boot>[0-9a-f]{8})-[0-9a-f]{8}$")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
    except OSError:
        return "0" * 8


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks after boot; None when it does not exist or is a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2:].split()  # after "pid (comm) ": field 3 (state) is fields[0]
    try:
        if fields[0] in (b"Z", b"X"):
            return None
        return int(fields[19])  # field 22
    except (IndexError, ValueError):
        return None


def _creator_tag() -> str:
    pid = os.getpid()
    return f"{pid}-{_start_ticks(pid) or 0}-{_boot_id()}"


def private_dir(kind: str, base: Path | str) -> Path:
    """A new empty dir ``<base>/runflare-<kind>-<pid>-<start>-<boot>-<random>``, mode 0700, owned by us."""
    if not re.fullmatch(r"[a-z0-9]+", kind):
        raise ValueError(f"scratch kind must be lowercase letters and digits, not {kind!r}")
    base = Path(base)
    tag = _creator_tag()
    while True:
        path = base / f"runflare-{kind}-{tag}-{secrets.token_hex(4)}"
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        return path


def creator_alive(name: str) -> bool | None:
    """Whether the process that made the dir called ``name`` still runs; None if ``name`` is not ours."""
    m = _NAME.match(name)
    if m is None:
        return None
    if m.group("boot") != _boot_id():
        return False
    return _start_ticks(int(m.group("pid"))) == int(m.group("start"))


def default_bases() -> list[Path]:
    """Where the engine makes its private dirs: memory-backed scratch, the temp dir and the runs root."""
    from runflare_server.engine.sandbox import process as sandbox

    bases = [sandbox.scratch_base(), Path(tempfile.gettempdir())]
    with contextlib.suppress(OSError):
        bases.append(sandbox.runs_root())
    return bases


def sweep_stale(bases: Iterable[Path] | None = None) -> int:
    """Remove the private dirs of dead creators under ``bases`` (default: ``default_bases()``); returns how
    many. Only real directories (not links) are considered, owned by this user (any owner when root: the
    engine hands some to sandbox uids)."""
    removed = 0
    seen: set[str] = set()
    for base in default_bases() if bases is None else bases:
        key = os.path.realpath(base)
        if key in seen:
            continue
        seen.add(key)
        try:
            entries = list(os.scandir(base))
        except OSError:
            continue
        for entry in entries:
            if creator_alive(entry.name) is not False:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() != 0:
                continue  # as root, also dirs handed to a sandbox uid (the kernel runtime dir)
            shutil.rmtree(entry.path, ignore_errors=True)  # never follows links (fd-based on Linux)
            if not os.path.lexists(entry.path):
                removed += 1
            else:
                log.warning("could not remove stale scratch dir %r", entry.path)
    if removed:
        log.info("removed %d scratch dirs a dead server left", removed)
    return removed
