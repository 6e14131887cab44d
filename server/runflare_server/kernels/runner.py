"""Compile and run one program in a fresh sandbox, streaming its output, enforcing its limits.

Runs inside the Run-Flare kernel process (never inside the server). Each step (compile, run) is one
process in one fresh sandbox and one fresh cgroup; a tiny Perl reaper (perl-base is Essential on Debian)
sits between the sandbox and the program so the exact exit code / signal / exec failure is reported
through a status pipe, which bubblewrap alone cannot do (it folds signals into 128+n).

A sandbox is started (``Runner.launch``) before its program is known: its reaper waits on a control
pipe for the argv, the rlimits and the stdin (``_go``). With ``ready_next`` (the Run-Flare kernel) the
next run's sandbox is started as soon as a run ends, so a run of the same language only pays for its
program: bubblewrap's set-up (~10 ms here) is off its path. See docs/security.md, "Sandboxes started ahead".
"""

from __future__ import annotations

import base64
import codecs
import collections
import contextlib
import errno
import os
import platform
import resource
import selectors
import shlex
import signal
import subprocess
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runflare_server.engine.interface import Limits
from runflare_server.engine.runs import languages as langs
from runflare_server.engine.sandbox import cgroups, kernel_sandbox, policy, seccomp
from runflare_server.engine.sandbox import process as sandbox
from runflare_server.engine.sandbox.cgroups import (
    GroupPool,
    RunCgroup,
    child_setup,
    exec_prefix,
    rlimit_values,
)
from runflare_server.kernels import reaper_binary

# Limits of the compile step when the request names none: Judge0's maxima (config_info's max_*), as Judge0
# compiles with the maximum limits. The server sends its own configured maxima (never above config_info's).
COMPILE_LIMITS = Limits(cpu_time_limit=15.0, cpu_extra_time=5.0, wall_time_limit=20.0, memory_limit=512_000,
                        stack_limit=128_000, max_processes_and_or_threads=120, max_file_size=4096,
                        max_output_bytes=64 * 1024)
PERL = "/usr/bin/perl"
SANDBOX_PROCESSES = 1  # the reaper, in the run's group with the program, not the program's to count (bwrap and
# its init stay outside: the reaper joins the group, see below)
# The reaper: started with the sandbox, it first joins the run's cgroup (0 to each join file, whose fds follow
# its other arguments: opened by the runner, written and closed by the reaper before anything else, so the
# program it forks starts in the group), then waits on its control pipe for the program (a sandbox may be
# started ahead of its run, see Runner.ready_next). The message, NUL-separated: the rlimit count n, n
# (resource, soft, hard) triples, the stdin ("" = /dev/null, "-" = inherited, else a file in the work dir,
# opened then unlinked), "1" to send stderr to stdout, then the program's argv. End of file without a
# message: the sandbox was discarded, nothing runs. Failures before the program runs write "launch ...".
REAPER = r"""
my ($fd, $ctl, $nr, $prctl, $rlim) = splice(@ARGV, 0, 5);
syscall($prctl, 4, 0) if $prctl > 0;  # PR_SET_DUMPABLE 0: the program cannot open /proc/<reaper>/fd
open(my $st, '>&=', $fd) or exit 120;
fcntl($st, 2, 1);  # F_SETFD, FD_CLOEXEC: the program must not inherit the status pipe
for my $j (@ARGV) {  # the run's cgroup join files: the reaper joins, so the program starts in the group
    open(my $g, '>&=', $j) or launch("cannot join cgroup (fd $j): $!");
    (syswrite($g, "0") // 0) == 1 or launch("cannot join cgroup (fd $j): $!");
    close $g;
}
open(my $c, '<&=', $ctl) or exit 120;
my $msg = do { local $/; <$c> };
close $c;
exit 0 if !defined $msg || $msg eq "";
my @f = split /\0/, $msg, -1;
my $n = shift @f;
my @lim = splice(@f, 0, 3 * $n);
my ($in, $merge) = splice(@f, 0, 2);
sub launch { syswrite $st, "launch $_[0]\n"; exit 125; }
if ($in ne "-") {
    my $path = $in eq "" ? "/dev/null" : $in;
    open(STDIN, '<', $path) or launch("cannot open the program's stdin: $!");
    unlink $path if $in ne "";
}
open(STDERR, '>&', \*STDOUT) or launch("cannot merge stderr: $!") if $merge;
my $pid = fork;
defined $pid or exit 121;
if (!$pid) {
    for (my $i = 0; $rlim > 0 && $i < @lim; $i += 3) {  # prlimit64(0, res, new, NULL); never above what was asked
        my ($r, $soft, $hard) = (0 + $lim[$i], 0 + $lim[$i + 1], 0 + $lim[$i + 2]);
        next if syscall($rlim, 0, $r, pack("Q2", $soft, $hard), 0) == 0;
        my $old = "\0" x 16;
        syscall($rlim, 0, $r, 0, $old) == 0 or launch("cannot read rlimit $r: $!");
        my $cap = (unpack("Q2", $old))[1];
        ($soft, $hard) = map { $_ < $cap ? $_ : $cap } ($soft, $hard);
        syscall($rlim, 0, $r, pack("Q2", $soft, $hard), 0) == 0 or launch("cannot set rlimit $r: $!");
    }
    exec { $f[0] } @f; syswrite $st, "exec " . ($! + 0) . " $!\n"; exit 127;
}
$SIG{$_} = 'IGNORE' for qw(HUP INT QUIT TERM PIPE USR1 USR2 ALRM);
while (waitpid($pid, 0) < 0) { }
my $s = $?;
my ($cpu, $rss) = ("-", "-");
if ($nr > 0) {  # getrusage(RUSAGE_CHILDREN): the program's own CPU time and peak RSS
    my $buf = "\0" x 256;
    if (syscall($nr, -1, $buf) == 0) {
        my @r = unpack("q5", $buf);
        ($cpu, $rss) = ($r[0] + $r[2] + ($r[1] + $r[3]) / 1e6, $r[4]);
    }
}
syswrite $st, (($s & 127) ? "signal " . ($s & 127) : "exit " . ($s >> 8)) . " $cpu $rss\n";
exit(($s & 127) ? 128 + ($s & 127) : ($s >> 8));
"""
POLL = 0.05
GETRUSAGE_NR = {"x86_64": 98, "aarch64": 165, "arm64": 165}.get(platform.machine(), -1)  # 64-bit struct layout
PRCTL_NR = {"x86_64": 157, "aarch64": 167, "arm64": 167}.get(platform.machine(), -1)
PRLIMIT_NR = {"x86_64": 302, "aarch64": 261, "arm64": 261}.get(platform.machine(), -1)


@dataclass
class StepResult:
    """What one sandboxed process did."""

    exit_code: int | None = None
    exit_signal: int | None = None
    exec_error: str | None = None
    time_limit: str | None = None  # "cpu" | "wall" when a limit killed it
    cpu: float | None = None
    wall: float | None = None
    memory: int | None = None
    oom: bool = False
    truncated: bool = False
    reaper_cpu: float | None = None  # the program's rusage, as its reaper saw it
    reaper_rss: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""


@dataclass
class ProgramResult:
    """The reply metadata of one run (JSON-able; stdout/stderr travel as exact bytes, base64)."""

    outcome: str
    stdout: bytes = b""
    stderr: bytes = b""
    compile_output: str | None = None
    exit_code: int | None = None
    exit_signal: int | None = None
    time: float | None = None
    wall_time: float | None = None
    memory: int | None = None
    message: str | None = None
    stages: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["stdout_b64"] = base64.b64encode(d.pop("stdout")).decode()
        d["stderr_b64"] = base64.b64encode(d.pop("stderr")).decode()
        return d


OnOutput = Callable[[str, str], None]  # (stream name, decoded text)


@dataclass(eq=False)
class Sandbox:
    """A started sandbox whose reaper waits for its program: its process, group, work dir and pipes."""

    key: Any
    workdir: Path
    status_fd: int
    control_fd: int
    ahead: bool  # started before its run's limits were known: _go sets them
    proc: subprocess.Popen | None = None
    cg: RunCgroup | None = None
    cpu_before: float = 0.0  # the group's CPU time when the program was sent (the sandbox's own start)
    killed: list[int] = field(default_factory=list)  # processes outside the group killed with it (_kill)

    def usable(self) -> bool:
        """Whether it still waits for a program (nothing killed it, its set-up did not fail)."""
        return self.proc is not None and self.control_fd >= 0 and self.proc.poll() is None

    def close_fds(self) -> None:
        for name in ("status_fd", "control_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


class Runner:
    """Compiles and runs programs of any available language in fresh sandboxes."""

    def __init__(self, mode: str = "auto", *, subreaper: bool = False, pool: int = 2,
                 ready_next: bool = False, defer_next: bool = False, compiled_reaper: bool = True) -> None:
        self.mode = sandbox.resolve_mode(mode)
        # The reaper in each sandbox: the compiled one where this host can build it (reaper.c), else Perl's.
        self.compiled_reaper = compiled_reaper
        # bwrap's inner process outlives the outer one by a moment; a subreaper collects it (not init).
        self.reap_orphans = subreaper and _set_subreaper(True)
        # This runner's slot: one host uid, held while the process lives (programs run one at a time).
        self.lease = policy.UidLease.acquire() if self.mode != "none" and policy.per_slot_uids() else None
        self.uid = self.lease.uid if self.lease else None
        # Fresh groups made ahead and deleted behind by a thread, off the runs' path.
        self.groups = GroupPool(pool) if pool and cgroups.mechanism() != "rlimit" else None
        self._closer = weakref.finalize(self, self.groups.close) if self.groups else None
        self._lang_env: dict[int, tuple[dict[str, str], list[str]]] = {}
        # Set a launch's rlimits by exec (prlimit) rather than in a preexec_fn, so Popen vforks.
        self.exec_setup = cgroups.exec_prefix_usable()
        # No core file of what starts a sandbox (bwrap, the reaper before its prctl): they inherit this.
        _, core_hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (0, core_hard))
        # After each run, start the next run's sandbox for the same language (its reaper sets the rlimits;
        # where prlimit64's number is unknown, only the launch sets them, so every sandbox starts with its run).
        self.ready_next = ready_next and PRLIMIT_NR > 0
        # With defer_next the caller says when (start_next): the kernel, once the run's reply is sent.
        self.defer_next = defer_next
        self._next_lang: langs.Language | None = None
        self._ready: Sandbox | None = None
        self._readying: Future | None = None
        # One long-lived thread starts them: bubblewrap ties its life to the thread that forked it
        # (--die-with-parent is PR_SET_PDEATHSIG, which fires when that thread exits, not the process).
        self._launcher = ThreadPoolExecutor(1, thread_name_prefix="runflare-ready-sandbox") if self.ready_next else None
        self._ready_lock = threading.RLock()  # close() may come from another thread (a kernel's control thread)

    def close(self) -> None:
        """Stop the group pool's thread, delete the groups it holds, and stop being a subreaper (orphans
        from then on go to init again, not to a process that may never reap them)."""
        with self._ready_lock:
            self.ready_next = False
            self._take_ready(None)
        if self._launcher is not None:
            self._launcher.shutdown(wait=True)
        if self._closer:
            self._closer()
        if self.reap_orphans:
            _set_subreaper(False)
            self.reap_orphans = False
            _reap_orphans(timeout=0)

    def _language_env(self, lang: langs.Language) -> tuple[dict[str, str], list[str]]:
        """The sandbox environment and read-only toolchain paths of a language (fixed for the process)."""
        if lang.id not in self._lang_env:
            env = sandbox.sandbox_env(lang.env, path=os.pathsep.join([*langs.tool_dirs(lang), sandbox.DEFAULT_PATH]))
            self._lang_env[lang.id] = (env, langs.ro_paths(lang))
        env, ro = self._lang_env[lang.id]
        return dict(env), list(ro)

    def run(self, language_id: int, source: str, *, stdin: bytes | None = None, args: str | None = None,
            compiler_options: str | None = None, limits: Limits | None = None, redirect_stderr: bool = False,
            on_output: OnOutput | None = None, on_stage: Callable[[str], None] | None = None,
            stdin_reader: Callable[[], bytes | None] | None = None,
            compile_limits: Limits | None = None) -> ProgramResult:
        """Compile (if needed) and run one program; never raises for the program's failures.

        The compile step is a sandboxed run like the program's own, under ``compile_limits`` (the server's
        maxima); compiler options change what the compiler does, never these limits."""
        limits = limits or Limits()
        compile_limits = compile_limits or COMPILE_LIMITS
        lang = langs.BY_ID.get(language_id)
        if lang is None or not langs.available(lang):
            return ProgramResult("internal", message=f"language {language_id} is not available here")
        try:
            argv = shlex.split(args or "")
            copts = shlex.split(compiler_options or "")
        except ValueError as e:
            return ProgramResult("internal", message=f"cannot split arguments: {e}")
        network = limits.enable_network
        ready = self._take_ready(lang.id) if not network and stdin_reader is None else None
        workdir = ready.workdir if ready else sandbox.new_workdir(uid=self.uid)
        try:
            source_path = workdir / lang.source_file
            source_path.write_text(source, encoding="utf-8", errors="surrogateescape")
            if self.uid is not None:
                os.chown(source_path, self.uid, self.uid)
            env, ro = self._language_env(lang)
            compile_output = None
            if lang.compile_cmd:
                if on_stage:
                    on_stage("compiling")
                cmd = langs.expand(lang.compile_cmd, compiler_options=copts, memory_kb=compile_limits.memory_limit)
                step = self.step(cmd, workdir, env, ro, compile_limits, merge_stderr=True, started=ready)
                ready = None
                compile_output = step.stdout.decode("utf-8", "replace") or None
                if step.exit_code != 0:
                    why = ("compilation time limit exceeded" if step.time_limit else
                           "compiler memory limit exceeded" if step.oom else
                           f"compiler killed by signal {step.exit_signal}" if step.exit_signal else
                           step.exec_error)
                    out = compile_output or ""
                    if why and why not in out:
                        out = f"{out}\n{why}".lstrip("\n")
                    return ProgramResult("compile_error", compile_output=out or None, message=why,
                                         time=step.cpu, wall_time=step.wall, memory=step.memory)
            if on_stage:
                on_stage("running")
            cmd = langs.expand(lang.run_cmd, args=argv, memory_kb=limits.memory_limit)
            step = self.step(cmd, workdir, env, ro, limits, stdin=stdin, merge_stderr=redirect_stderr,
                             on_output=on_output, stdin_reader=stdin_reader, network=network, started=ready)
            ready = None
            return self._result(step, limits, compile_output)
        except Exception as e:  # noqa: BLE001 - the kernel must answer even when the host fails
            return ProgramResult("internal", message=f"{type(e).__name__}: {e}")
        finally:
            if ready is not None:
                self.discard(ready)
            sandbox.remove_workdir(workdir)
            if self.ready_next:
                self._next_lang = lang
                if not self.defer_next:
                    self.start_next()

    def _take_ready(self, lang_id: int | None) -> Sandbox | None:
        """The sandbox started ahead for a run of ``lang_id``, if it still waits; one for another language
        (or any, with None) is discarded and not returned."""
        with self._ready_lock:
            if self._readying is not None:
                self._readying.result()
                self._readying = None
            ready, self._ready = self._ready, None
            if ready is None:
                return None
            if lang_id is not None and ready.key == (lang_id, cgroups.mechanism()) and ready.usable():
                return ready
            self.discard(ready)
            sandbox.remove_workdir(ready.workdir)
            return None

    def start_next(self) -> None:
        """Start the sandbox of the next run, for the last run's language (with ``ready_next``)."""
        lang, self._next_lang = self._next_lang, None
        if lang is not None and self.ready_next:
            self._ready_soon(lang)

    def _ready_soon(self, lang: langs.Language) -> None:
        """Start the next run's sandbox for ``lang`` on the launcher thread (after this run's processes are
        gone: the two never live at once under this runner's uid)."""
        def start() -> None:
            workdir = sandbox.new_workdir(uid=self.uid)
            try:
                env, ro = self._language_env(lang)
                self._ready = self.launch(workdir, env, ro, key=(lang.id, cgroups.mechanism()))
            except Exception:  # noqa: BLE001 - the next run starts its own sandbox then
                sandbox.remove_workdir(workdir)

        with self._ready_lock:
            if not self.ready_next:  # closed meanwhile
                return
            self._take_ready(None)
            self._readying = self._launcher.submit(start)

    @staticmethod
    def _result(step: StepResult, limits: Limits, compile_output: str | None) -> ProgramResult:
        r = ProgramResult("exited", stdout=step.stdout, stderr=step.stderr, compile_output=compile_output,
                          exit_code=step.exit_code, exit_signal=step.exit_signal, time=step.cpu,
                          wall_time=step.wall, memory=step.memory)
        msgs = []
        judged_cpu = step.reaper_cpu if limits.enable_per_process_and_thread_time_limit else step.cpu
        if step.exec_error:
            r.outcome, r.exit_code = "exec_format", None
            msgs.append(step.exec_error)
        elif step.time_limit or step.exit_signal == signal.SIGXCPU or (
                judged_cpu is not None and judged_cpu > limits.cpu_time_limit):
            r.outcome = "time_limit"
            msgs.append("wall time limit exceeded" if step.time_limit == "wall" else "CPU time limit exceeded")
        elif step.oom:
            r.exit_signal, r.exit_code = int(signal.SIGKILL), None
            msgs.append("memory limit exceeded")
        elif step.exit_signal:
            msgs.append(f"killed by signal {step.exit_signal} ({signal.Signals(step.exit_signal).name})"
                        if step.exit_signal in signal.Signals._value2member_map_ else f"killed by signal {step.exit_signal}")
        elif step.exit_code:
            msgs.append(f"exited with code {step.exit_code}")
        if step.truncated:
            msgs.append(f"output truncated after {limits.max_output_bytes} bytes")
        r.message = "; ".join(msgs) or None
        return r

    def step(self, argv: list[str], workdir: Path, env: dict[str, str], ro: list[str], limits: Limits, *,
             stdin: bytes | None = None, merge_stderr: bool = False, on_output: OnOutput | None = None,
             stdin_reader: Callable[[], bytes | None] | None = None, network: bool = False,
             started: Sandbox | None = None) -> StepResult:
        """Run ``argv`` as one fresh sandboxed process under ``limits`` and wait for it (in ``started``, a
        sandbox started ahead for ``workdir``, else in one started now)."""
        sb = started or self.launch(workdir, env, ro, limits, network=network, stdin_pipe=stdin_reader is not None)
        return self._go(sb, argv, limits, stdin=stdin, merge_stderr=merge_stderr, on_output=on_output,
                        stdin_reader=stdin_reader)

    def launch(self, workdir: Path, env: dict[str, str], ro: list[str], limits: Limits | None = None, *,
               network: bool = False, stdin_pipe: bool = False, key: Any = None) -> Sandbox:
        """Start a fresh sandbox on ``workdir`` whose reaper waits for its program (``_go``). With
        ``limits`` its rlimits and cgroup limits are set now (a sandbox for a run at hand); without, it is
        started ahead of its run and ``_go`` sets them all before the program starts."""
        st_r, st_w = os.pipe()
        ctl_r, ctl_w = os.pipe()
        filter_fd = seccomp.bpf_fd() if self.mode == "bwrap" else -1
        sb = Sandbox(key=key, workdir=workdir, status_fd=st_r, control_fd=ctl_w, ahead=limits is None)
        reaper_fd = reaper_binary.fd() if self.compiled_reaper else None
        join_fds: list[int] = []
        try:
            group_memory, max_pids = _group_limits(limits) if limits is not None else (None, None)
            if self.groups is not None:
                sb.cg = self.groups.take(group_memory, max_pids)
            else:
                sb.cg = RunCgroup.create(f"run-{os.getpid()}-{uuid.uuid4().hex[:12]}", group_memory, max_pids)
            join_fds = sb.cg.open_join_files() if sb.cg is not None else []
            joins = [str(fd) for fd in join_fds]
            if reaper_fd is not None:
                reaper = [f"/proc/self/fd/{reaper_fd}", str(st_w), str(ctl_r), str(reaper_fd), *joins]
            else:
                reaper = [PERL, "-e", REAPER, str(st_w), str(ctl_r), str(GETRUSAGE_NR), str(PRCTL_NR),
                          str(PRLIMIT_NR), *joins]
            passed = tuple(fd for fd in (st_w, ctl_r, filter_fd, reaper_fd, *join_fds) if fd is not None and fd >= 0)
            cmd = sandbox.wrap(reaper, workdir=workdir, mode=self.mode, env=env, network=network,
                               ro_paths=ro, uid=self.uid, seccomp_fd=filter_fd if filter_fd >= 0 else None)
            values = rlimit_values(limits, sb.cg is not None) if limits is not None else {}  # the reaper sets them
            if self.exec_setup:
                cmd = exec_prefix(values) + cmd
                preexec = None
            else:
                preexec = child_setup(values)
            sb.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, pass_fds=passed,
                cwd=workdir, start_new_session=True, env=_outer_env(self.mode, env, network), preexec_fn=preexec)
            return sb
        except BaseException:
            self.discard(sb)
            raise
        finally:
            for fd in (st_w, ctl_r, filter_fd, *join_fds):
                if fd >= 0:
                    os.close(fd)

    def _go(self, sb: Sandbox, argv: list[str], limits: Limits, *, stdin: bytes | None = None,
            merge_stderr: bool = False, on_output: OnOutput | None = None,
            stdin_reader: Callable[[], bytes | None] | None = None) -> StepResult:
        """Run the program in ``sb`` (its limits set first), stream its output, wait for it, clean up."""
        res = StepResult()
        waited = False
        proc, cg = sb.proc, sb.cg
        try:
            stdin_name = ""
            if stdin_reader is not None:
                stdin_name = "-"
            elif stdin:
                stdin_name = f".stdin-{uuid.uuid4().hex}"  # opened then unlinked by the reaper, before the program
                fd = os.open(sb.workdir / stdin_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as f:
                    if self.uid is not None:
                        os.fchown(f.fileno(), self.uid, self.uid)
                    f.write(stdin)
            if cg is not None and sb.ahead:
                cg.set_limits(*_group_limits(limits))
                sb.cpu_before = cg.cpu_seconds() or 0.0  # the sandbox's own start, before the program's
            values = rlimit_values(limits, cg is not None)
            fields = [str(len(values))]
            for r, (soft, hard) in values.items():
                fields += [str(r), str(soft), str(hard)]
            fields += [stdin_name, "1" if merge_stderr else "", *argv]
            start = time.monotonic()
            try:
                _send_all(sb.control_fd, "\0".join(fields).encode("utf-8", "surrogateescape"))
            except BrokenPipeError:  # the sandbox ended before its reaper read: say why if it wrote it
                _wait(proc)
                waited = True
                raise OSError(_launch_line(_read_all(sb.status_fd)) or "the sandbox ended before its program started") from None
            os.close(sb.control_fd)
            sb.control_fd = -1
            feeder = _start_feeder(proc, stdin_reader) if stdin_reader is not None else None
            self._pump(sb, res, limits, start, on_output)
            _, status, rusage = _wait(proc)
            waited = True
            res.wall = round(time.monotonic() - start, 3)
            if feeder:
                feeder.join(timeout=1)
            if cg:
                res.oom = cg.oom_killed()
                used = cg.cpu_seconds()
                res.cpu = None if used is None else max(0.0, used - sb.cpu_before)
                res.memory = cg.peak_memory_kb()
            status_text = _read_all(sb.status_fd)
            launch = _launch_line(status_text)
            if launch:  # the set-up failed before the program ran
                raise OSError(launch)
            _parse_status(status_text, status, res)
            if res.cpu is None:
                res.cpu = res.reaper_cpu if res.reaper_cpu is not None else rusage.ru_utime + rusage.ru_stime
            if res.memory is None:
                res.memory = res.reaper_rss or rusage.ru_maxrss
            res.cpu = round(res.cpu, 3)
            return res
        finally:
            if not waited:
                _kill(sb)
                with contextlib.suppress(ChildProcessError):
                    _wait(proc)
            self._collect(sb)
            sb.close_fds()

    def discard(self, sb: Sandbox) -> None:
        """Stop a sandbox whose program never ran (or failed to start) and free what it holds."""
        if sb.proc is not None:
            _kill(sb)
            with contextlib.suppress(ChildProcessError):
                _wait(sb.proc)
        self._collect(sb)
        sb.close_fds()

    def _collect(self, sb: Sandbox) -> None:
        """Make sure nothing of the step lives on. With a group: every process in it is killed (one read of
        cgroup.procs when it is already empty, as usual), children that have exited are collected without
        waiting for the rest, and the group is deleted by the pool's thread (or here, without one); a
        sandbox that was killed (``_kill``) is also waited for until its init is gone. Without a group: wait
        (bounded) until the sandbox's dying init is collected."""
        cg = sb.cg
        if cg is not None:
            cg.kill_all()
            if self.groups is not None:
                self.groups.give_back(cg)
            else:
                cg.remove()
            if self.reap_orphans:
                _reap_orphans(timeout=0)  # only those already gone, waiting for none
            _wait_gone(sb.killed)
        elif self.reap_orphans:
            _reap_orphans()

    @staticmethod
    def _pump(sb: Sandbox, res: StepResult, limits: Limits, start: float, on_output: OnOutput | None) -> None:
        """Read stdout/stderr until EOF, keeping up to the cap, killing the sandbox on a time limit."""
        proc, cg, cpu_before = sb.proc, sb.cg, sb.cpu_before
        sel = selectors.DefaultSelector()
        names = {}
        bufs = {"stdout": bytearray(), "stderr": bytearray()}
        decoders = {n: codecs.getincrementaldecoder("utf-8")("replace") for n in bufs}
        for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            if pipe is not None:
                os.set_blocking(pipe.fileno(), False)
                sel.register(pipe, selectors.EVENT_READ)
                names[pipe.fileno()] = name
        kept = 0
        next_check = 0.0
        out = _Coalescer(on_output)
        cpu_cap = limits.cpu_time_limit + limits.cpu_extra_time
        group_cpu = not limits.enable_per_process_and_thread_time_limit  # else RLIMIT_CPU per process only
        try:
            while names:
                for key, _ in sel.select(out.timeout(POLL)):
                    fd = key.fileobj.fileno()
                    try:
                        chunk = os.read(fd, 1 << 16)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(key.fileobj)
                        del names[fd]
                        continue
                    room = limits.max_output_bytes - kept
                    if len(chunk) > room:
                        res.truncated = True
                        chunk = chunk[:max(room, 0)]
                    if chunk:
                        kept += len(chunk)
                        bufs[names[fd]] += chunk
                        if on_output:
                            out.add(names[fd], decoders[names[fd]].decode(chunk))
                now = time.monotonic()
                out.flush_if_due(now)
                if now < next_check:
                    continue
                next_check = now + POLL
                elapsed = now - start
                if res.time_limit is None:
                    if elapsed > limits.wall_time_limit:
                        res.time_limit = "wall"
                    elif cg and group_cpu and (cg.cpu_seconds() or 0) - cpu_before > cpu_cap:
                        res.time_limit = "cpu"
                    if res.time_limit:
                        _kill(sb)
                elif elapsed > limits.wall_time_limit + 5:
                    _kill(sb)  # still open: something holds the pipes; keep killing
        finally:
            sel.close()
        for name, dec in decoders.items():
            out.add(name, dec.decode(b"", final=True))
        out.flush()
        res.stdout, res.stderr = bytes(bufs["stdout"]), bytes(bufs["stderr"])


class _Coalescer:
    """Turns output chunks into stream messages. A chunk goes out at once while the last ``BURST``
    messages took at least ``BURST * SPACING`` seconds (a program printing now and then, or steadily below
    1 / SPACING lines a second, is never held back); a flood is batched, at most one message per
    ``SPACING`` on average, or one per ``MAX`` characters. The order across streams is kept."""

    SPACING = 0.01
    BURST = 4
    MAX = 64 * 1024

    def __init__(self, sink: OnOutput | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.sink = sink
        self.clock = clock
        self.pending: list[list[str]] = []  # [name, text] runs, in order
        self.size = 0
        self.sent: collections.deque[float] = collections.deque(maxlen=self.BURST)  # the last flushes' times

    def due(self) -> float:
        """When the pending batch may go out (now or earlier: at once)."""
        if len(self.sent) < self.BURST:
            return 0.0
        return self.sent[0] + self.BURST * self.SPACING

    def add(self, name: str, text: str) -> None:
        if not self.sink or not text:
            return
        if self.pending and self.pending[-1][0] == name:
            self.pending[-1][1] += text
        else:
            self.pending.append([name, text])
        self.size += len(text)
        if self.size >= self.MAX or self.clock() >= self.due():
            self.flush()

    def timeout(self, idle: float) -> float:
        """How long the reader may wait for more output before the batch is due."""
        if not self.pending:
            return idle
        return max(0.0, min(idle, self.due() - self.clock()))

    def flush_if_due(self, now: float) -> None:
        if self.pending and now >= self.due():
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        pending, self.pending, self.size = self.pending, [], 0
        self.sent.append(self.clock())
        for name, text in pending:
            self.sink(name, text)


def _kill(sb: Sandbox) -> None:
    """Kill the whole sandbox: bubblewrap's init (in a session of its own, outside the run's group; its
    end takes its PID namespace with it, a reaper that had not joined the group yet included), the bwrap
    process, and the group. The init's pid is kept in ``sb.killed`` for ``_collect`` to wait for."""
    proc = sb.proc
    if proc.returncode is None:  # not reaped: its pid, and its children's, are still its own
        for pid in kernel_sandbox.child_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if pid not in sb.killed:
                sb.killed.append(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)  # not proc.kill(): it may reap the process before our wait4
    if sb.cg:
        sb.cg.kill_all()


def _wait_gone(pids: list[int], timeout: float = 5.0) -> None:
    """Wait (bounded) until these killed processes are gone: collected here when they were re-parented
    to this subreaper, else until they no longer exist."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break
            except ChildProcessError:  # not (or no longer) a child of this process
                if kernel_sandbox.exited(pid):
                    break
            time.sleep(0.001)


def _wait(proc: subprocess.Popen) -> tuple[int, int, Any]:
    """wait4 the sandbox process (its rusage covers every reaped descendant)."""
    while True:
        try:
            pid, status, rusage = os.wait4(proc.pid, 0)
            break
        except InterruptedError:
            continue
    proc.returncode = os.waitstatus_to_exitcode(status)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe:
            with contextlib.suppress(OSError):
                pipe.close()
    return pid, status, rusage


def _group_limits(limits: Limits) -> tuple[int | None, int]:
    """The run's cgroup memory (KB; None with Judge0's per-process memory flag: rlimits apply to each process
    instead) and process limits (the sandbox's own processes not counted against the program)."""
    memory = None if limits.enable_per_process_and_thread_memory_limit else limits.memory_limit
    return memory, limits.max_processes_and_or_threads + SANDBOX_PROCESSES


def _launch_line(status_text: str) -> str | None:
    """The line saying why a sandbox's set-up failed before its program ran, if any."""
    return next((line for line in status_text.splitlines() if line.startswith("launch ")), None)


def _send_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to a blocking pipe."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_all(fd: int) -> str:
    data = b""
    os.set_blocking(fd, False)
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 4096):
            data += chunk
    return data.decode(errors="replace")


def _reaper_exited_as_it_said(line: str, status: int) -> bool:
    """Whether the sandbox's exit status is what the reaper's last line implies (exit n → n, signal n → 128+n)."""
    kind, _, rest = line.partition(" ")
    if kind not in ("exit", "signal") or not os.WIFEXITED(status):
        return False
    try:
        value = int(rest.split()[0])
    except (IndexError, ValueError):
        return False
    return os.WEXITSTATUS(status) == (value if kind == "exit" else 128 + value) % 256


def _parse_status(text: str, status: int, res: StepResult) -> None:
    """Exit code / signal / exec failure from the reaper's line, else from the sandbox's own status."""
    lines = text.strip().splitlines()
    line = lines[-1] if lines else ""  # the reaper writes last: earlier lines may be the program's forgeries
    if not _reaper_exited_as_it_said(line, status):
        line = ""  # the reaper was killed: believe only the sandbox's own status
    elif len(lines) > 1 and lines[-2].startswith("exec ") and line.startswith("exit 127 "):
        line = lines[-2]
    kind, _, rest = line.partition(" ")
    if kind in ("exit", "signal"):
        value, cpu, rss = (rest.split() + ["-", "-"])[:3]
        if kind == "exit":
            res.exit_code = int(value)
        else:
            res.exit_signal = int(value)
        with contextlib.suppress(ValueError):
            res.reaper_cpu, res.reaper_rss = float(cpu), int(rss)
    elif kind == "exec":
        code, _, msg = rest.partition(" ")
        res.exec_error = f"cannot execute the program: {msg}"
        if not code.isdigit() or int(code) not in (errno.ENOEXEC, errno.EACCES, errno.ENOENT):
            res.exec_error += f" (errno {code})"
    elif os.WIFSIGNALED(status):
        res.exit_signal = os.WTERMSIG(status)  # the sandbox itself was killed (limit, or the program killed its parent)
    else:
        code = os.WEXITSTATUS(status)
        if code > 128:
            res.exit_signal = code - 128
        else:
            res.exit_code = code


def _start_feeder(proc: subprocess.Popen, reader: Callable[[], bytes | None]):
    """A thread copying chunks from ``reader`` to the program's stdin until it returns None."""
    def feed() -> None:
        try:
            while (chunk := reader()) is not None:
                if proc.poll() is not None:
                    break
                proc.stdin.write(chunk)
                proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.close()

    t = threading.Thread(target=feed, name="runflare-stdin", daemon=True)
    t.start()
    return t


def _set_subreaper(on: bool) -> bool:
    """Make this process the reaper of its orphaned descendants, or stop (prctl PR_SET_CHILD_SUBREAPER)."""
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, int(on), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _reap_orphans(timeout: float = 1.0) -> None:
    """Collect orphans that were re-parented to this (subreaper) process; they are dying sandbox inits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            if time.monotonic() > deadline:
                return
            time.sleep(0.002)


def _outer_env(mode: str, env: dict[str, str], network: bool = False) -> dict[str, str]:
    """The sandbox tool's own environment: nothing of the kernel's (bwrap's init could leak it via /proc);
    a network run's launcher also needs the server's code (it never reaches the sandbox: --clearenv)."""
    if mode != "bwrap":
        return dict(env)
    return policy.launcher_env() if network and policy.per_slot_uids() else {"PATH": sandbox.DEFAULT_PATH}
