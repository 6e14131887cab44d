"""Start a command as uid 0 of a new user namespace that the server maps onto a leased block of host uids.

Usage (as root, by the server):
``python -m runflare_server.engine.sandbox.userns_launcher VIEW_DIR SRC[,SRC...] [--become UID] -- ARGV``.

1. A private mount namespace with a tmpfs on ``VIEW_DIR`` (an empty, world-traversable host dir), where each
   SRC (a tree the sandbox needs, possibly below a private dir such as ``/root``) is bound read-only as
   ``VIEW_DIR/<n>`` (read-write when written ``rw:SRC``): reachable by the unprivileged uids, without
   changing any host permission.
2. A new user namespace; ``userns`` on stdout, then the server writes ``uid_map``/``gid_map`` (only a process
   privileged outside may map a block of other uids) and answers ``mapped`` on stdin.
3. uid 0 of the namespace (the block's first host uid: never host root), then ``exec ARGV`` (bubblewrap,
   which builds the rest of the view with the capabilities it has inside that namespace only).

With ``--become UID`` steps 2 and 3 are replaced by becoming host ``UID`` (no groups, no capabilities)
before ``exec ARGV``: how a network kernel starts pasta and an unprivileged bubblewrap.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

CLONE_NEWNS, CLONE_NEWUSER = 0x20000, 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def main(argv: list[str]) -> None:
    view, sources, *rest = argv
    become = None
    if rest[:1] == ["--become"]:
        become, rest = int(rest[1]), rest[2:]
    sep, *command = rest or [""]
    if sep != "--" or not command:
        raise SystemExit("usage: userns_launcher VIEW_DIR SRC[,SRC...] [--become UID] -- ARGV")
    libc = ctypes.CDLL(None, use_errno=True)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # as a shell would leave them (Python ignores both)
        signal.signal(sig, signal.SIG_DFL)

    def mount(src: str, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        _check(libc.mount(src.encode(), dst.encode(), fstype.encode() if fstype else None, flags,
                          data.encode() if data else None), f"mount {dst}")

    _check(libc.unshare(CLONE_NEWNS), "unshare mount namespace")
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", view, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
    for n, src in enumerate(s for s in sources.split(",") if s):
        dst = f"{view}/{n}"
        os.mkdir(dst, 0o755)
        writable = src.startswith("rw:")
        mount(src.removeprefix("rw:"), dst, None, MS_BIND | MS_REC)
        mount("none", dst, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | (0 if writable else MS_RDONLY))
    mount("none", view, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    if become is not None:
        os.setgroups([])
        os.setresgid(become, become, become)
        os.setresuid(become, become, become)
        os.execvp(command[0], command)
    _check(libc.unshare(CLONE_NEWUSER), "unshare user namespace")
    sys.stdout.write("userns\n")
    sys.stdout.flush()
    if sys.stdin.readline().strip() != "mapped":
        raise SystemExit("the server did not map the user namespace")
    os.setresgid(0, 0, 0)
    os.setgroups([])
    os.setresuid(0, 0, 0)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
