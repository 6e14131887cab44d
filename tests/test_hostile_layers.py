"""Hostile programs against each sandbox layer of a program run, each failing FOR ITS LAYER'S REASON.

Every test asserts the errno (or the exact status and message) the layer gives, never merely "not
Accepted": identity (a leased unprivileged host uid, no capabilities, no_new_privs), /proc as runc leaves
it (read-only and masked paths, no /sys), the seccomp filter (EPERM / ENOSYS, other ABIs killed), the
compile step (same sandbox, the server's maxima), the process limit (cgroup pids and RLIMIT_NPROC), the
work dir's host path, and the network. The engine is used directly (``Runner``), plus one run through a
real Run-Flare kernel. In CI a missing layer (bwrap, root, cgroups, a toolchain) is a failure, not a skip.
"""

from __future__ import annotations

import errno
import os
import platform
import re
import socket
import tempfile
import threading
from pathlib import Path

import pytest

from runflare_server.engine.interface import Limits, RunRequest
from runflare_server.engine.runs import languages
from runflare_server.engine.sandbox import cgroups, policy, seccomp
from runflare_server.engine.sandbox import process as sandbox
from runflare_server.kernels.runner import Runner

pytestmark = pytest.mark.timeout(240)
AVAILABLE = {info.id for info in languages.language_infos()}
QUICK = Limits(cpu_time_limit=5.0, cpu_extra_time=1.0, wall_time_limit=20.0)


def require(condition: bool, why: str) -> None:
    """Skip when a layer or toolchain is missing here; in CI, fail: a sandbox test never turns green
    (or silently disappears) because bwrap, root, cgroups or seccomp went missing."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"sandbox layer missing in CI: {why}")
    pytest.skip(why)


def need_lang(lang: int) -> None:
    require(lang in AVAILABLE, f"toolchain for language {lang} not installed")


def need_x86_64() -> None:
    require(platform.machine() == "x86_64", "the raw syscall numbers here are x86_64's")


@pytest.fixture(scope="module")
def runner() -> Runner:
    try:
        r = Runner("bwrap", ready_next=True)  # as in the Run-Flare kernel: each run's sandbox started ahead
    except sandbox.SandboxUnavailable as e:
        require(False, f"bwrap unusable: {e}")
    require(policy.per_slot_uids(), "not root: sandboxes run in a user namespace, not as a leased host uid")
    assert r.uid in policy.UidRange.from_env() and r.uid != 0
    yield r
    r.close()
    r.lease.release()


def run(runner: Runner, lang: int, source: str, limits: Limits = QUICK, **kw):
    need_lang(lang)
    return runner.run(lang, source, limits=limits, **kw)


def ok_lines(result) -> list[str]:
    """The program's stdout lines, after checking it ran to a clean exit (so the lines are all there)."""
    assert (result.outcome, result.exit_code, result.message) == ("exited", 0, None), result
    return result.stdout.decode().splitlines()


@pytest.fixture
def rlimit_only(monkeypatch):
    monkeypatch.setenv("RUNFLARE_CGROUPS", "off")
    cgroups._detect.cache_clear()
    yield
    monkeypatch.undo()
    cgroups._detect.cache_clear()


# ---------------------------------------------------------------- identity

IDENTITY_PY = r"""
import errno, os
def err(f):
    try:
        f()
        return "OK"
    except OSError as e:
        return errno.errorcode[e.errno]
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
print("ids", os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups())
for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp"):
    print(k, status[k].strip())
print("setuid", err(lambda: os.setuid(0)))
print("setgid", err(lambda: os.setgid(0)))
print("setgroups", err(lambda: os.setgroups([0])))
for p in ("/dev/rf-pwn", "/run/rf-pwn", "/rf-pwn", "/etc/rf-pwn", "/usr/rf-pwn"):
    print(p, err(lambda: open(p, "w")))
"""


def test_identity_is_a_leased_unprivileged_uid(runner: Runner) -> None:
    lines = ok_lines(run(runner, 71, IDENTITY_PY))
    uid = runner.uid
    assert lines[0] == f"ids {uid} {uid} {uid} {uid} []"
    assert lines[1:8] == ["CapInh 0000000000000000", "CapPrm 0000000000000000", "CapEff 0000000000000000",
                          "CapBnd 0000000000000000", "CapAmb 0000000000000000", "NoNewPrivs 1",
                          "Seccomp 2"]  # SECCOMP_MODE_FILTER
    assert lines[8:11] == ["setuid EPERM", "setgid EPERM", "setgroups EPERM"]  # no CAP_SETUID/SETGID
    # root-owned 0755 tmpfs dirs (/dev, /run, /) refuse the slot uid by permission; the system is read-only
    assert lines[11:] == ["/dev/rf-pwn EACCES", "/run/rf-pwn EACCES", "/rf-pwn EACCES",
                          "/etc/rf-pwn EROFS", "/usr/rf-pwn EROFS"]


def test_identity_from_c_and_bash(runner: Runner) -> None:
    c = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
int main(void) {
    gid_t groups[4];
    printf("%d %d %d\n", (int)getuid(), (int)getgid(), getgroups(4, groups));
    printf("setuid %s\n", setuid(0) == 0 ? "OK" : strerrorname_np(errno));
    printf("open %s\n", open("/dev/rf-pwn", O_CREAT | O_WRONLY, 0600) >= 0 ? "OK" : strerrorname_np(errno));
    return 0;
}
"""
    assert ok_lines(run(runner, 50, c)) == [f"{runner.uid} {runner.uid} 0", "setuid EPERM", "open EACCES"]
    bash = "id -u; id -g; id -G; (: > /run/rf-pwn) 2>&1; (: > /proc/sys/kernel/core_pattern) 2>&1; true"
    lines = ok_lines(run(runner, 46, bash))
    assert lines[:3] == [str(runner.uid)] * 3  # id -G: its own gid only, no supplementary groups
    assert lines[3].endswith("/run/rf-pwn: Permission denied"), lines
    assert lines[4].endswith("/proc/sys/kernel/core_pattern: Read-only file system"), lines


def test_two_runners_at_once_run_as_different_uids(runner: Runner) -> None:
    """Each Runner holds its own lease: two programs running at the same moment have distinct uids.
    The programs print their uid, then wait on stdin until BOTH have printed (so they overlap)."""
    other = Runner("bwrap")
    try:
        assert other.uid != runner.uid and other.uid in policy.UidRange.from_env()
        src = "import os, sys\nprint(os.getuid(), flush=True)\nsys.stdin.readline()\nprint('done', os.getuid())"
        printed = {runner.uid: threading.Event(), other.uid: threading.Event()}
        results: dict[int, object] = {}

        def go(r: Runner) -> None:
            sent: list[bool] = []

            def on_output(stream: str, text: str) -> None:
                if stream == "stdout" and str(r.uid) in text:
                    printed[r.uid].set()

            def stdin_reader() -> bytes | None:
                if sent:
                    return None
                sent.append(all(e.wait(60) for e in printed.values()))  # both are running right now
                return b"go\n"

            results[r.uid] = r.run(71, src, limits=QUICK, on_output=on_output, stdin_reader=stdin_reader)
            results[-r.uid] = sent

        threads = [threading.Thread(target=go, args=(r,)) for r in (runner, other)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for uid in (runner.uid, other.uid):
            assert ok_lines(results[uid]) == [str(uid), f"done {uid}"]
            assert results[-uid] == [True]  # it got its input only once both programs had printed
    finally:
        other.lease.release()


# ---------------------------------------------------------------- /proc and /sys

PROC_PY = r"""
import errno, os
def err(f):
    try:
        r = f()
        return "OK" if r is None else repr(r)
    except OSError as e:
        return errno.errorcode[e.errno]
def write(p):
    with open(p, "w") as f:
        f.write("|/bin/sh -c 'id > /tmp/owned'")
def read(p):
    with open(p, "rb") as f:
        return len(f.read())
print("core_pattern", err(lambda: write("/proc/sys/kernel/core_pattern")))
print("core_pattern-no-trunc", err(lambda: os.open("/proc/sys/kernel/core_pattern", os.O_WRONLY)))
print("sysctl", err(lambda: write("/proc/sys/kernel/poweroff_cmd")))
print("sysrq-trigger", err(lambda: write("/proc/sysrq-trigger")))
for p in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug", "/proc/interrupts"):
    print(p, err(lambda: read(p)))
print("/proc/acpi", err(lambda: os.listdir("/proc/acpi")))
print("/sys", err(lambda: os.stat("/sys")))
print("/sys/kernel", err(lambda: os.stat("/sys/kernel/uevent_helper")))
"""


def test_proc_is_read_only_and_masked_as_runc_leaves_it(runner: Runner) -> None:
    lines = dict(line.split(" ", 1) for line in ok_lines(run(runner, 71, PROC_PY)))
    # The host escape: core_pattern (and every sysctl) is on a read-only bind of /proc/sys. An
    # open with O_TRUNC meets the read-only mount first (EROFS: the /proc layer); a plain O_WRONLY meets
    # the file's 0644 root:root mode first (EACCES: the identity layer). Each layer refuses on its own.
    assert lines["core_pattern"] == "EROFS"
    assert lines["core_pattern-no-trunc"] == "EACCES"
    assert lines["sysctl"] == "EROFS"
    # Read-only bind when the host has it; this kernel may have no sysrq support at all.
    assert lines["sysrq-trigger"] == ("EROFS" if os.path.exists("/proc/sysrq-trigger") else "ENOENT")
    # Masked files are /dev/null bound read-only on the nodev /proc: opening them is EACCES, never data.
    for p in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug", "/proc/interrupts"):
        assert lines[p] == ("EACCES" if os.path.exists(p) else "ENOENT"), (p, lines[p])
    # Masked dirs are an empty read-only tmpfs.
    assert lines["/proc/acpi"] == ("[]" if os.path.isdir("/proc/acpi") else "ENOENT")
    assert lines["/sys"] == "ENOENT" and lines["/sys/kernel"] == "ENOENT"
    assert os.path.exists("/proc/keys") and os.path.exists("/proc/timer_list")  # so the test above means something


def test_core_pattern_attack_from_c(runner: Runner) -> None:
    """The issue's attack as written: set core_pattern to a pipe, then crash. The write fails with EROFS
    and the crash is only this program's own SIGSEGV."""
    c = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(void) {
    int fd = open("/proc/sys/kernel/core_pattern", O_WRONLY | O_TRUNC);  /* the mount check comes first */
    printf("open O_TRUNC %s\n", fd >= 0 ? "OK" : strerrorname_np(errno));
    fd = open("/proc/sys/kernel/core_pattern", O_WRONLY);  /* the permission check comes first */
    printf("open %s\n", fd >= 0 ? "OK" : strerrorname_np(errno));
    if (fd >= 0) write(fd, "|/bin/sh -c id", 14);
    fflush(stdout);
    raise(SIGSEGV);
    return 0;
}
"""
    before = Path("/proc/sys/kernel/core_pattern").read_text()
    result = run(runner, 50, c)
    assert result.stdout == b"open O_TRUNC EROFS\nopen EACCES\n", result
    assert (result.outcome, result.exit_signal, result.message) == ("exited", 11, "killed by signal 11 (SIGSEGV)")
    assert Path("/proc/sys/kernel/core_pattern").read_text() == before


# ---------------------------------------------------------------- seccomp

SECCOMP_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

struct clone_args_v0 { unsigned long long flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls; };

/* Arguments chosen so that WITHOUT the filter each call gives something other than the filter's answer
   (success, or another errno): the EPERM/ENOSYS below can only be the filter's. */
static long call(int which) {
    static char params[120];
    struct clone_args_v0 ca = {0};
    long r;
    switch (which) {
    case 0: return syscall(SYS_keyctl, 0 /* KEYCTL_GET_KEYRING_ID */, -2 /* process keyring */, 1);
    case 1: return syscall(SYS_add_key, "user", "rf-key", "secret", 6, -2);
    case 2: return syscall(SYS_request_key, "user", "rf-key", NULL, 0);
    case 3: return syscall(SYS_bpf, 0x7fff, NULL, 0);
    case 4: return syscall(SYS_perf_event_open, NULL, 0, -1, -1, 0);
    case 5: return syscall(SYS_userfaultfd, 1 /* UFFD_USER_MODE_ONLY */ | O_CLOEXEC);
    case 6: return syscall(SYS_io_uring_setup, 1, params);
    case 7: return syscall(SYS_unshare, CLONE_NEWUSER);
    case 8: r = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0); if (r == 0) _exit(0); return r;
    case 9: ca.flags = CLONE_NEWUSER; ca.exit_signal = SIGCHLD;
            r = syscall(435 /* clone3 */, &ca, sizeof ca); if (r == 0) _exit(0); return r;
    case 10: return syscall(SYS_mount, "none", "/rf-no-such-dir", "tmpfs", 0, NULL);
    case 11: return syscall(SYS_ptrace, 0 /* PTRACE_TRACEME */, 0, 0, 0);
    case 12: return syscall(SYS_setns, -1, CLONE_NEWUSER);
    }
    return -2;
}
static const char *names[] = {"keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
                              "io_uring_setup", "unshare", "clone", "clone3", "mount", "ptrace", "setns"};
static void *thread(void *arg) { *(int *)arg = 42; return NULL; }

int main(void) {
    for (int i = 0; i < 13; i++) {  /* each in its own child: a call that works must not change the next */
        fflush(stdout);
        pid_t p = fork();
        if (p < 0) { printf("fork %s\n", strerrorname_np(errno)); return 1; }
        if (p == 0) {
            errno = 0;
            long r = call(i);
            printf("%s %s\n", names[i], r == -1 ? strerrorname_np(errno) : "OK");
            fflush(stdout);
            _exit(0);
        }
        int st;
        waitpid(p, &st, 0);
        if (!WIFEXITED(st)) printf("%s died\n", names[i]);
    }
    pthread_t t;
    int value = 0;
    int e = pthread_create(&t, NULL, thread, &value);
    if (e == 0) pthread_join(t, NULL);
    printf("thread %s %d\n", e ? strerrorname_np(e) : "OK", value);
    return 0;
}
"""
SECCOMP_EXPECTED = ["keyctl EPERM", "add_key EPERM", "request_key EPERM", "bpf EPERM", "perf_event_open EPERM",
                    "userfaultfd EPERM", "io_uring_setup EPERM", "unshare EPERM", "clone EPERM", "clone3 ENOSYS",
                    "mount EPERM", "ptrace EPERM", "setns EPERM",
                    "thread OK 42"]  # fork (each line above) and threads still work: not a kill-everything filter


def test_seccomp_denies_with_its_errno_from_c(runner: Runner) -> None:
    need_x86_64()
    assert ok_lines(run(runner, 50, SECCOMP_C, compiler_options="-pthread")) == SECCOMP_EXPECTED


def test_seccomp_probe_tells_the_filter_apart(runner: Runner, monkeypatch) -> None:
    """Control for the test above: the same probe under an allow-everything filter (every other layer in
    place) gets different answers for every call, so the EPERM/ENOSYS above are the filter's own."""
    need_x86_64()
    import pyseccomp as sc

    def allow_all() -> bytes:
        with tempfile.TemporaryFile() as out:
            sc.SyscallFilter(defaction=sc.ALLOW).export_bpf(out)
            out.seek(0)
            return out.read()

    monkeypatch.setattr(seccomp, "bpf", allow_all)
    lines = ok_lines(run(runner, 50, SECCOMP_C, compiler_options="-pthread"))
    assert len(lines) == len(SECCOMP_EXPECTED)
    for got, filtered in zip(lines[:-1], SECCOMP_EXPECTED[:-1], strict=True):
        assert got.split()[0] == filtered.split()[0] and got != filtered, (got, filtered)
    # e.g. a new user namespace, userfaultfd and io_uring all work without the filter
    assert {"unshare OK", "clone OK", "clone3 OK", "userfaultfd OK", "io_uring_setup OK"} <= set(lines)


SECCOMP_PY = r"""
import ctypes, errno, os, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
L = ctypes.c_long
CLONE_NEWUSER, SIGCHLD = 0x10000000, 17
params = ctypes.create_string_buffer(120)
clone_args = (ctypes.c_uint64 * 8)(CLONE_NEWUSER, 0, 0, 0, SIGCHLD, 0, 0, 0)
calls = [
    ("keyctl", 250, (0, -2, 1)),
    ("add_key", 248, (b"user", b"rf-key", b"secret", 6, -2)),
    ("request_key", 249, (b"user", b"rf-key", None, 0)),
    ("bpf", 321, (0x7fff, None, 0)),
    ("perf_event_open", 298, (None, 0, -1, -1, 0)),
    ("userfaultfd", 323, (1 | os.O_CLOEXEC,)),
    ("io_uring_setup", 425, (1, params)),
    ("unshare", 272, (CLONE_NEWUSER,)),
    ("clone", 56, (CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)),
    ("clone3", 435, (ctypes.byref(clone_args), ctypes.sizeof(clone_args))),
    ("mount", 165, (b"none", b"/rf-no-such-dir", b"tmpfs", 0, None)),
    ("ptrace", 101, (0, 0, 0, 0)),
    ("setns", 308, (-1, CLONE_NEWUSER)),
]
for name, nr, args in calls:
    ctypes.set_errno(0)
    r = libc.syscall(L(nr), *[L(a) if isinstance(a, int) else a for a in args])
    if r == 0 and name.startswith("clone"):
        os._exit(0)  # only if the filter let it through: the child leaves at once
    print(name, errno.errorcode[ctypes.get_errno()] if r == -1 else "OK", flush=True)
pid = os.fork()
if pid == 0:
    os._exit(7)
print("fork", os.waitpid(pid, 0)[1] >> 8)
box = []
t = threading.Thread(target=box.append, args=(42,))
t.start(); t.join()
print("thread OK", box[0])
"""


def test_seccomp_denies_with_its_errno_from_python(runner: Runner) -> None:
    need_x86_64()
    assert ok_lines(run(runner, 71, SECCOMP_PY)) == [*SECCOMP_EXPECTED[:-1], "fork 7", "thread OK 42"]


def test_other_abis_are_killed(runner: Runner) -> None:
    """A 32-bit ``int 0x80`` call would get around a deny-list written for x86_64 numbers: the filter's
    architecture check kills the process with SIGSYS instead."""
    need_x86_64()
    c = r"""
#include <stdio.h>
int main(void) {
    long r;
    printf("before\n");
    fflush(stdout);
    __asm__ volatile ("int $0x80" : "=a"(r) : "a"(20L) : "memory");  /* i386 getpid */
    printf("int80 returned %ld\n", r);
    return 0;
}
"""
    result = run(runner, 50, c)
    assert result.stdout == b"before\n"
    assert (result.outcome, result.exit_signal, result.message) == ("exited", 31, "killed by signal 31 (SIGSYS)")


def test_bash_cannot_make_a_user_namespace(runner: Runner) -> None:
    # unshare(1) (util-linux) reports the failed call with strerror(EPERM)
    lines = ok_lines(run(runner, 46, "unshare --user --map-root-user id -u 2>&1; echo rc=$?"))
    assert lines == ["unshare: unshare failed: Operation not permitted", "rc=1"]


# ---------------------------------------------------------------- the keyring finding


def test_keys_cannot_pass_from_one_program_to_the_next(runner: Runner) -> None:
    """The issue's finding: a submission left keys another one read. add_key is EPERM, so nothing is
    stored; the next program finds nothing (its keyring calls are EPERM too); the host sees no key of
    the slot uid."""
    need_x86_64()
    common = "import ctypes, errno\nlibc = ctypes.CDLL(None, use_errno=True)\nL = ctypes.c_long\n" \
             "def res(r):\n    return errno.errorcode[ctypes.get_errno()] if r == -1 else 'OK %d' % r\n"
    add = common + ("for ring in (-4, -5, -3, -2):  # user, user-session, session, process keyrings\n"
                    "    print('add_key', ring, res(libc.syscall(L(248), b'user', b'rf-shared', b'secret', L(6), L(ring))))\n")
    read = common + ("print('request_key', res(libc.syscall(L(249), b'user', b'rf-shared', None, L(0))))\n"
                     "print('search', res(libc.syscall(L(250), L(10), L(-4), b'user', b'rf-shared', L(0))))\n"
                     "try:\n    print('proc-keys', len(open('/proc/keys').read()))\n"
                     "except OSError as e:\n    print('proc-keys', errno.errorcode[e.errno])\n")
    assert ok_lines(run(runner, 71, add)) == [f"add_key {r} EPERM" for r in (-4, -5, -3, -2)]
    assert ok_lines(run(runner, 71, read)) == ["request_key EPERM", "search EPERM", "proc-keys EACCES"]


# ---------------------------------------------------------------- the compile step

WRAPPER_REPORT = ('echo "wrapped uid=$(id -u) gid=$(id -g)"; grep -E "^(CapEff|NoNewPrivs|Seccomp):" /proc/self/status; '
                  '(: > /proc/sys/kernel/core_pattern) 2>&1; test -e /sys || echo "no /sys"; exec "$0" "$@"')


def test_compiler_wrapper_runs_as_the_slot_uid_in_the_sandbox(runner: Runner) -> None:
    """gcc -wrapper runs the submitter's command around every compiler subprocess: it runs as the slot's
    uid, with no capabilities, the filter on, /proc/sys read-only, no /sys."""
    opts = f"-wrapper '/bin/sh,-c,{WRAPPER_REPORT}'"
    result = run(runner, 50, 'int main(void){ return 0; }', compiler_options=opts)
    assert (result.outcome, result.exit_code) == ("exited", 0), result
    out = result.compile_output or ""
    reports = out.count("wrapped uid=")
    assert reports >= 2, out  # cc1, as, collect2...: each ran under the wrapper
    assert out.count(f"wrapped uid={runner.uid} gid={runner.uid}") == reports, out
    assert out.count("CapEff:\t0000000000000000") == reports
    assert out.count("NoNewPrivs:\t1") == reports and out.count("Seccomp:\t2") == reports
    assert out.count("/proc/sys/kernel/core_pattern: Read-only file system") == reports
    assert out.count("no /sys") == reports


def test_submission_as_its_own_compiler_wrapper_script(runner: Runner) -> None:
    """-wrapper running a script: the submission is a shell/C polyglot that runs itself around cc1."""
    src = ("#if 0\n"
           "echo \"script uid=$(id -u)\"\n"
           "(exec 3>/proc/sys/kernel/core_pattern) 2>&1\n"
           "exec \"$@\"\n"
           "#endif\n"
           "#include <stdio.h>\n"
           "int main(void){ puts(\"compiled\"); return 0; }\n")
    result = run(runner, 50, src, compiler_options="-wrapper /bin/sh,main.c")
    assert result.stdout == b"compiled\n", result
    out = result.compile_output or ""
    assert f"script uid={runner.uid}" in out and "script uid=0" not in out, out
    assert "/proc/sys/kernel/core_pattern: Read-only file system" in out, out


# Each exceeds the compile limits given here but not the default ones (COMPILE_LIMITS: 20 s, 512 MB), so the
# compile fails only if the step really runs under the limits the server passed; then cc1 runs as usual.
# (The sleep happens once per compile: the wrapper runs around cc1, as and collect2.)
SLEEP_THEN_COMPILE = """-wrapper '/bin/sh,-c,test -e slept || { : > slept; sleep 8; }; exec "$0" "$@"'"""
BALLOON_THEN_COMPILE = """-wrapper '/bin/sh,-c,python3 -c "b = bytearray(200 << 20)" && exec "$0" "$@"'"""


def test_compile_step_wall_limit(runner: Runner) -> None:
    limits = Limits(cpu_time_limit=2.0, cpu_extra_time=0.5, wall_time_limit=2.0)
    result = run(runner, 50, "int main(void){return 0;}", compiler_options=SLEEP_THEN_COMPILE, compile_limits=limits)
    assert (result.outcome, result.message) == ("compile_error", "compilation time limit exceeded"), result
    assert "compilation time limit exceeded" in (result.compile_output or "")
    assert result.time is not None and result.memory is not None and result.wall_time is not None
    # the same compile under the default compile limits succeeds: the limit above is what stopped it
    ok = run(runner, 50, "int main(void){return 0;}", compiler_options=SLEEP_THEN_COMPILE)
    assert (ok.outcome, ok.exit_code) == ("exited", 0), ok


def test_compile_step_cpu_limit(runner: Runner) -> None:
    limits = Limits(cpu_time_limit=1.0, cpu_extra_time=0.5, wall_time_limit=60.0)
    result = run(runner, 50, "int main(void){return 0;}",
                 compiler_options="-wrapper '/bin/sh,-c,while :; do :; done'", compile_limits=limits)
    assert (result.outcome, result.message) == ("compile_error", "compilation time limit exceeded"), result
    assert result.time is not None and result.time >= 1.0 and result.memory is not None


def test_compile_step_memory_limit(runner: Runner) -> None:
    require(cgroups.mechanism() != "rlimit", "no writable cgroup hierarchy: the compiler's OOM is a cgroup's")
    limits = Limits(memory_limit=64_000, wall_time_limit=60.0)
    result = run(runner, 50, "int main(void){return 0;}", compiler_options=BALLOON_THEN_COMPILE,
                 compile_limits=limits)
    assert (result.outcome, result.message) == ("compile_error", "compiler memory limit exceeded"), result
    assert result.memory is not None and 0 < result.memory <= 64_000 and result.time is not None
    ok = run(runner, 50, "int main(void){return 0;}", compiler_options=BALLOON_THEN_COMPILE)
    assert (ok.outcome, ok.exit_code) == ("exited", 0), ok


def test_compile_memory_limit_in_rlimit_mode(runner: Runner, rlimit_only) -> None:
    """Without cgroups the compile step's memory limit is RLIMIT_AS: the allocation itself fails."""
    limits = Limits(memory_limit=64_000, wall_time_limit=60.0)
    result = run(runner, 50, "int main(void){return 0;}", compiler_options=BALLOON_THEN_COMPILE,
                 compile_limits=limits)
    assert result.outcome == "compile_error", result
    assert "MemoryError" in (result.compile_output or ""), result
    assert result.time is not None and result.memory is not None


# ---------------------------------------------------------------- process limit

FORK_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(void) {
    pid_t kids[1000];
    int n = 0;
    for (;;) {
        pid_t p = fork();
        if (p == 0) { pause(); _exit(0); }
        if (p < 0) { printf("forked %d then %s\n", n, strerrorname_np(errno)); break; }
        kids[n++] = p;
        if (n == 1000) { printf("forked %d then NO LIMIT\n", n); break; }
    }
    fflush(stdout);
    for (int i = 0; i < n; i++) kill(kids[i], SIGKILL);
    return 0;
}
"""
FORK_PY = r"""
import errno, os, signal
kids = []
while len(kids) < 1000:
    try:
        pid = os.fork()
    except OSError as e:
        print("forked", len(kids), "then", errno.errorcode[e.errno])
        break
    if pid == 0:
        signal.pause()
        os._exit(0)
    kids.append(pid)
else:
    print("forked", len(kids), "then NO LIMIT")
for pid in kids:
    os.kill(pid, signal.SIGKILL)
"""
FORK_BASH = "for i in $(seq 1000); do sleep 600 & done 2>&1 | grep -m1 -o 'Resource temporarily unavailable'; " \
            "jobs -p | wc -l >/dev/null; kill $(jobs -p) 2>/dev/null; true"


def check_fork_limit(runner: Runner, lang: int, src: str) -> None:
    limits = Limits(**{**QUICK.__dict__, "max_processes_and_or_threads": 10})
    lines = ok_lines(run(runner, lang, src, limits=limits))
    m = re.fullmatch(r"forked (\d+) then (\w+)", lines[0])
    assert m and m.group(2) == "EAGAIN", lines
    assert 1 <= int(m.group(1)) < 10, lines  # the program itself counts: at most 9 more


@pytest.mark.parametrize("lang,src", [(50, FORK_C), (71, FORK_PY)], ids=["c", "python"])
def test_process_limit_with_cgroups(runner: Runner, lang: int, src: str) -> None:
    require(cgroups.mechanism() != "rlimit", "no writable cgroup hierarchy here")
    check_fork_limit(runner, lang, src)


@pytest.mark.parametrize("lang,src", [(50, FORK_C), (71, FORK_PY)], ids=["c", "python"])
def test_process_limit_in_rlimit_only_mode(runner: Runner, rlimit_only, lang: int, src: str) -> None:
    """RLIMIT_NPROC counts the slot uid's processes: it holds because the program is not root."""
    assert cgroups.mechanism() == "rlimit"
    check_fork_limit(runner, lang, src)


@pytest.mark.parametrize("mode", ["cgroups", "rlimit"])
def test_bash_fork_bomb_is_refused(runner: Runner, request, mode: str) -> None:
    if mode == "rlimit":
        request.getfixturevalue("rlimit_only")
    else:
        require(cgroups.mechanism() != "rlimit", "no writable cgroup hierarchy here")
    limits = Limits(**{**QUICK.__dict__, "max_processes_and_or_threads": 10})
    result = run(runner, 46, FORK_BASH, limits=limits)
    assert result.stdout == b"Resource temporarily unavailable\n", result  # bash's fork: EAGAIN


# ---------------------------------------------------------------- the work dir's host path

MOUNTINFO_PY = "print(open('/proc/self/mountinfo').read(), end='')"


def box_mount(mountinfo: str) -> tuple[str, str]:
    """(root within its file system, file system type) of the /box mount."""
    for line in mountinfo.splitlines():
        fields = line.split()
        if fields[4] == "/box":
            return fields[3], fields[fields.index("-") + 1]
    raise AssertionError(f"no /box mount in {mountinfo}")


def test_work_dir_host_path_direct_runner(runner: Runner) -> None:
    """Without a Run-Flare kernel around it (no private runs mount), what holds: the program sees its
    work dir as /box, and the host's absolute path of that dir appears nowhere."""
    host_root = str(sandbox.runs_root())
    info = ok_lines(run(runner, 71, MOUNTINFO_PY))
    text = "\n".join(info)
    root, fstype = box_mount(text)
    assert re.fullmatch(r".*/[0-9a-f]{32}", root), root
    assert host_root not in text  # e.g. /dev/shm/runflare-runs-0: mount roots are relative to their fs


def test_work_dir_on_a_private_tmpfs_like_a_kernel() -> None:
    """What runflare_kernel.main does first (private_runs_mount), then a run: the work dir is on a fresh
    tmpfs, so no part of the host path (runflare-runs, /dev/shm) is in the program's mountinfo."""
    require(os.geteuid() == 0, "the private runs mount needs root")
    import subprocess
    import sys

    code = ("from runflare_server.engine.sandbox import process as sandbox\n"
            "from runflare_server.kernels.runner import Runner\n"
            "assert sandbox.private_runs_mount()\n"
            f"r = Runner('bwrap').run(71, {MOUNTINFO_PY!r})\n"
            "assert r.exit_code == 0, r\n"
            "print(r.stdout.decode(), end='')\n")
    runs_dir = sandbox.runs_root() / f"hostile-{os.getpid()}"
    env = {**os.environ, "RUNFLARE_RUNS_DIR": str(runs_dir)}
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        assert list(runs_dir.iterdir()) == []  # the run dir lived on the child's private tmpfs only
    finally:
        runs_dir.rmdir()
    check_private_mountinfo(out.stdout)


def check_private_mountinfo(text: str) -> None:
    root, fstype = box_mount(text)
    assert re.fullmatch(r"/[0-9a-f]{32}", root) and fstype == "tmpfs", (root, fstype)
    assert "runflare-runs" not in text, text
    for line in text.splitlines():  # /dev/shm only as the sandbox's own /dev/shm mount point
        if "/dev/shm" in line:
            assert line.split()[3:5] == ["/", "/dev/shm"], line


def test_work_dir_through_a_real_kernel() -> None:
    from runflare_server.engine.runs.program_runs import BlockingProgramRuns

    require(os.geteuid() == 0, "the private runs mount needs root")
    with BlockingProgramRuns(1) as pr:
        result, _ = pr.run(RunRequest(token="mountinfo", source_code=MOUNTINFO_PY, language_id=71, limits=QUICK))
    assert (result.outcome, result.exit_code) == ("exited", 0), result
    check_private_mountinfo(result.stdout)


# ---------------------------------------------------------------- network


@pytest.fixture
def host_server():
    """A TCP server on the host's 127.0.0.1 that records every connection it accepts."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    accepted: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, addr = listener.accept()
                accepted.append(addr)
                conn.close()
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield listener.getsockname()[1], accepted
    stop.set()
    t.join()
    listener.close()


def test_network_off_python(runner: Runner, host_server) -> None:
    port, accepted = host_server
    src = (f"import errno, socket\ns = socket.socket()\ne = s.connect_ex(('127.0.0.1', {port}))\n"
           "print('connect', errno.errorcode.get(e, e))\n"
           "print('interfaces', sorted(n for _, n in socket.if_nameindex()))\n")
    assert ok_lines(run(runner, 71, src)) == ["connect ECONNREFUSED", "interfaces ['lo']"]  # its own loopback
    assert accepted == []


def test_network_off_c(runner: Runner, host_server) -> None:
    port, accepted = host_server
    c = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
int main(void) {
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(%d);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    printf("connect %%s\n", connect(s, (struct sockaddr *)&a, sizeof a) == 0 ? "OK" : strerrorname_np(errno));
    return 0;
}
""" % port
    assert ok_lines(run(runner, 50, c)) == ["connect ECONNREFUSED"]
    bash = f"(exec 3<>/dev/tcp/127.0.0.1/{port}) 2>&1 | sed 's/.*: //' | sort -u; true"
    assert ok_lines(run(runner, 46, bash)) == ["Connection refused"]  # strerror(ECONNREFUSED)
    assert accepted == []


def test_errno_names_are_what_this_suite_assumes() -> None:
    # guards the string comparisons above against a platform with other names
    assert (errno.errorcode[errno.EPERM], errno.errorcode[errno.ENOSYS], errno.errorcode[errno.EROFS],
            errno.errorcode[errno.EACCES]) == ("EPERM", "ENOSYS", "EROFS", "EACCES")
