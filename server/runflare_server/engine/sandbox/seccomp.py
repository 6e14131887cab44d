"""The seccomp filter every sandboxed process runs under, modeled on Docker's default profile.

Docker's profile is an allow-list whose default answer is EPERM; what it leaves out (without extra
capabilities) is what a container must never do. Run-Flare keeps the complement as a deny-list, so a
toolchain's unusual but harmless call still works, and denies each listed call with the errno Docker
gives. The filter is built once with libseccomp (through ``pyseccomp``) and handed to bubblewrap as a
BPF program (``--seccomp FD``) or loaded by the fork server in each kernel it forks.

Calls of another ABI (32-bit x86, x32) are not in the filter's architecture list: libseccomp kills the
process that makes them (``SCMP_ACT_KILL`` for a bad architecture), so the deny-list cannot be bypassed
through ``int 0x80``.
"""

from __future__ import annotations

import errno
import functools
import os
import tempfile

# syscall → why a submission must not make it. Each is denied with EPERM, except where ENOSYS is noted.
DENIED: dict[str, str] = {
    # Kernel keyrings are not namespaced: keys one sandbox adds are readable by another of the same uid
    # and count against the host user's quota.
    "add_key": "kernel keyrings are shared across sandboxes",
    "keyctl": "kernel keyrings are shared across sandboxes",
    "request_key": "kernel keyrings are shared across sandboxes",
    # Large, frequently exploited kernel attack surfaces no program here needs.
    "io_uring_setup": "io_uring: a large attack surface, bypasses seccomp for the calls it batches",
    "io_uring_enter": "io_uring",
    "io_uring_register": "io_uring",
    "bpf": "loads programs into the kernel",
    "perf_event_open": "hardware counters and kernel profiling; a side channel",
    "userfaultfd": "stalls kernel code paths at will (a classic exploit primitive)",
    "kexec_load": "replaces the running kernel",
    "kexec_file_load": "replaces the running kernel",
    "init_module": "loads kernel modules",
    "finit_module": "loads kernel modules",
    "delete_module": "unloads kernel modules",
    "create_module": "kernel modules (obsolete)",
    "get_kernel_syms": "kernel modules (obsolete)",
    "query_module": "kernel modules (obsolete)",
    # File system views: a sandbox never changes its mounts or root.
    "mount": "changes the file system view",
    "umount": "changes the file system view",
    "umount2": "changes the file system view",
    "pivot_root": "changes the root",
    "chroot": "changes the root",
    "fsopen": "new mount API", "fsconfig": "new mount API", "fsmount": "new mount API",
    "fspick": "new mount API", "move_mount": "new mount API", "open_tree": "new mount API",
    "mount_setattr": "new mount API",
    "open_by_handle_at": "opens files by handle, around the mount view (the 'shocker' escape)",
    "name_to_handle_at": "file handles, paired with open_by_handle_at",
    # Namespaces: a new user namespace hands the program every capability inside it.
    "unshare": "new namespaces (a user namespace grants capabilities)",
    "setns": "joins other namespaces",
    # Other processes: no debugging or memory access across processes.
    "ptrace": "inspects and controls other processes",
    "process_vm_readv": "reads another process's memory",
    "process_vm_writev": "writes another process's memory",
    "kcmp": "compares kernel objects of other processes (address leaks)",
    "pidfd_getfd": "steals file descriptors of other processes",
    # Host-wide settings and devices.
    "reboot": "host power state",
    "swapon": "host swap", "swapoff": "host swap",
    "acct": "host process accounting",
    "settimeofday": "host clock", "clock_settime": "host clock", "clock_adjtime": "host clock",
    "adjtimex": "host clock", "stime": "host clock",
    "syslog": "the kernel log (addresses of kernel objects)",
    "quotactl": "file system quotas", "quotactl_fd": "file system quotas",
    "nfsservctl": "kernel NFS server", "_sysctl": "host settings (obsolete interface)",
    "uselib": "obsolete loader", "ustat": "obsolete", "sysfs": "obsolete",
    "lookup_dcookie": "kernel profiling",
    "vhangup": "hangs up terminals",
    "ioperm": "raw I/O ports", "iopl": "raw I/O ports",
    "vm86": "legacy mode", "vm86old": "legacy mode",
    "fanotify_init": "watches the whole file system",
    "open_tree_attr": "new mount API",
    "move_pages": "moves other processes' pages between NUMA nodes",
    "migrate_pages": "moves other processes' pages between NUMA nodes",
}
# clone3 passes its flags in memory a filter cannot read: ENOSYS makes libc fall back to clone(2), whose
# flags the filter checks (Docker does the same).
ENOSYS_CALLS = ("clone3",)
CLONE_NEWUSER = 0x10000000


@functools.cache
def bpf() -> bytes:
    """The filter as a BPF program (what ``bwrap --seccomp FD`` reads), built once per process."""
    import pyseccomp as sc

    f = sc.SyscallFilter(defaction=sc.ALLOW)
    for name in DENIED:
        try:
            f.add_rule(sc.ERRNO(errno.EPERM), name)
        except (RuntimeError, ValueError, OSError):
            pass  # not a call on this architecture
    for name in ENOSYS_CALLS:
        f.add_rule(sc.ERRNO(errno.ENOSYS), name)
    # clone(2) with CLONE_NEWUSER: a new user namespace, through the one call that can still make one.
    f.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER))
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()


def bpf_fd() -> int:
    """A fresh read-only fd positioned at the start of the filter (each bwrap reads its own to EOF)."""
    fd = os.memfd_create("runflare-seccomp", os.MFD_CLOEXEC)
    os.write(fd, bpf())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
