"""The compiled reaper (``reaper.c``): built once per host and user, executed from a sealed memfd.

The Perl reaper (``runner.REAPER``) costs a Perl interpreter's start and compile in every sandbox (about
3.6 ms of CPU per run here); the compiled one speaks the same protocol. It is built with the host's C
compiler into the user's cache (platformdirs' ``user_cache_dir``: ``~/.cache/runflare``, 0700), keyed by
the source's hash, then copied into a sealed memfd that sandboxes execute as ``/proc/self/fd/N`` (no
mount, no path the sandbox could reach, not subject to a noexec /run or /tmp). Without a C compiler the
runner keeps the Perl reaper.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import platformdirs

SOURCE = Path(__file__).with_name("reaper.c")
COMM = "runflare-reaper"  # its process name (PR_SET_NAME), as ps and /proc/PID/comm show it
_SEALS = 0x0001 | 0x0002 | 0x0004 | 0x0008  # F_SEAL_SEAL, SHRINK, GROW, WRITE

log = logging.getLogger(__name__)
_lock = threading.Lock()
_made = False  # fd() has tried (once per process)
_memfd: int | None = None


def _build() -> bytes | None:
    """The compiled reaper's bytes, from the cache or freshly built; None without a C compiler."""
    source = SOURCE.read_bytes()
    cached = Path(platformdirs.user_cache_dir("runflare")) / f"reaper-{hashlib.sha256(source).hexdigest()[:16]}"
    with contextlib.suppress(OSError):
        return cached.read_bytes()
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    cached.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        out = Path(tmp) / "reaper"
        done = subprocess.run([cc, "-O2", "-o", str(out), str(SOURCE)], capture_output=True, timeout=120)
        if done.returncode != 0:
            log.warning("the compiled reaper did not build (%s); using the Perl reaper",
                        done.stderr.decode(errors="replace")[-500:])
            return None
        os.replace(out, cached)  # atomic: a concurrent build writes the same bytes
    return cached.read_bytes()


def fd() -> int | None:
    """A read-only, sealed memfd holding the compiled reaper, open for this process's lifetime (sandboxes
    inherit it through ``pass_fds``), or None where it cannot be built. Made once, whichever thread asks."""
    global _made, _memfd
    with _lock:
        if not _made:
            _memfd, _made = _make(), True
        return _memfd


def _make() -> int | None:
    try:
        binary = _build()
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("the compiled reaper is not available (%s); using the Perl reaper", e)
        return None
    if binary is None:
        return None
    memfd = os.memfd_create("runflare-reaper", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(memfd, binary)
        os.fchmod(memfd, 0o555)
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, _SEALS)
        # reopened read-only: a file open for writing cannot be executed (ETXTBSY)
        return os.open(f"/proc/self/fd/{memfd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(memfd)
