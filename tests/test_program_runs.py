"""Program runs end to end through the pool of real Run-Flare kernels (real sandboxes, real toolchains)."""

from __future__ import annotations

import asyncio
import os

import psutil
import pytest
from conftest import wait_until

from runflare_server.engine.interface import Limits, RunRequest
from runflare_server.engine.jupyter.lean_session import LeanSession
from runflare_server.engine.runs import languages
from runflare_server.engine.runs.program_runs import BlockingProgramRuns

AVAILABLE = {info.id for info in languages.language_infos()}

# Each program prints "<greeting> <first stdin line> <argv joined by |>" and exits 0.
HELLO = {
    71: "import sys\nprint('hello', input(), '|'.join(sys.argv[1:]))",
    63: "const l = require('fs').readFileSync(0, 'utf8').split('\\n')[0];\n"
        "console.log('hello', l, process.argv.slice(2).join('|'))",
    74: "const buf = new Uint8Array(1024); const n = Deno.stdin.readSync(buf) ?? 0;\n"
        "const l = new TextDecoder().decode(buf.subarray(0, n)).split('\\n')[0];\n"
        "console.log('hello', l, Deno.args.join('|'))",
    46: 'read l; IFS="|"; echo "hello $l $*"',
    50: '#include <stdio.h>\nint main(int c, char **v){ char l[64]; scanf("%63s", l); printf("hello %s ", l);\n'
        'for (int i = 1; i < c; i++) printf(i > 1 ? "|%s" : "%s", v[i]); printf("\\n"); return 0; }',
    54: '#include <iostream>\n#include <string>\nint main(int c, char **v){ std::string l; std::cin >> l;\n'
        'std::cout << "hello " << l << " "; for (int i = 1; i < c; i++) std::cout << (i > 1 ? "|" : "") << v[i];\n'
        'std::cout << std::endl; }',
    62: 'import java.util.Scanner;\npublic class Main { public static void main(String[] a) {\n'
        'String l = new Scanner(System.in).next(); System.out.println("hello " + l + " " + String.join("|", a)); } }',
    73: 'use std::io::BufRead;\nfn main() { let l = std::io::stdin().lock().lines().next().unwrap().unwrap();\n'
        'let a: Vec<String> = std::env::args().skip(1).collect(); println!("hello {} {}", l, a.join("|")); }',
    60: 'package main\nimport ("bufio"; "fmt"; "os"; "strings")\nfunc main() { s := bufio.NewScanner(os.Stdin); s.Scan();\n'
        'fmt.Println("hello", s.Text(), strings.Join(os.Args[1:], "|")) }',
    72: 'l = $stdin.gets.chomp\nputs "hello #{l} #{ARGV.join("|")}"',
    85: 'my $l = <STDIN>; chomp $l; print "hello $l ", join("|", @ARGV), "\\n";',
}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory):
    runs = tmp_path_factory.mktemp("runs")
    with BlockingProgramRuns(2, runs_dir=str(runs)) as pr:
        yield pr
    assert not any(p.is_dir() for p in runs.iterdir()), "work dirs left behind"


def req(source: str, language_id: int = 71, **kw) -> RunRequest:
    return RunRequest(token="t", source_code=source, language_id=language_id, **kw)


def kernel_pids(pool: BlockingProgramRuns) -> list[int]:
    return [k.km.provisioner.process.pid for k in pool.engine._all if k.km.provisioner]


@pytest.mark.parametrize("lang", sorted(HELLO))
def test_hello_stdin_argv_in_every_language(pool, lang):
    if lang not in AVAILABLE:
        pytest.skip(f"toolchain for {lang} not installed")
    result, events = pool.run(req(HELLO[lang], lang, stdin="world\nignored\n", command_line_arguments="a 'b c' \"d\""))
    assert result.outcome == "exited", result
    assert result.exit_code == 0, result
    assert result.stdout == "hello world a|b c|d\n"
    assert result.time is not None and result.time > 0
    assert result.wall_time is not None and result.wall_time > 0
    assert result.memory is not None and result.memory > 0
    stages = [e["stage"] for e in events if e["kind"] == "stage"]
    assert stages[-1] == "running"
    assert ("compiling" in stages) == bool(languages.BY_ID[lang].compile_cmd)
    streamed = "".join(e["text"] for e in events if e["kind"] == "stream" and e["stream"] == "stdout")
    assert streamed == result.stdout


def test_sql_runs_the_script(pool):
    if 82 not in AVAILABLE:
        pytest.skip("sqlite3 not installed")
    result, _ = pool.run(req("create table t(x); insert into t values (20), (22); select sum(x) from t;", 82))
    assert (result.outcome, result.exit_code, result.stdout) == ("exited", 0, "42\n")


def test_languages_carry_detected_versions():
    by_id = {i.id: i for i in languages.language_infos()}
    assert 71 in by_id
    assert by_id[71].name.startswith("Python (3.")
    assert by_id[71].kernel == "runflare-python"
    assert all(i.id < 1000 for i in by_id.values())
    if 50 in by_id:
        assert by_id[50].name.startswith("C (GCC ") and by_id[50].compile_cmd and by_id[50].source_file == "main.c"


def test_exit_code_and_stderr(pool):
    result, events = pool.run(req("import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)"))
    assert (result.outcome, result.exit_code, result.stdout, result.stderr) == ("exited", 3, "out\n", "err\n")
    assert "".join(e["text"] for e in events if e.get("stream") == "stderr") == "err\n"


def test_redirect_stderr_to_stdout(pool):
    result, _ = pool.run(req("import sys\nprint('a', flush=True)\nprint('b', file=sys.stderr, flush=True)\nprint('c')",
                             redirect_stderr_to_stdout=True))
    assert (result.stdout, result.stderr) == ("a\nb\nc\n", "")


def test_uncaught_exception_is_nonzero_exit(pool):
    result, _ = pool.run(req("raise ValueError('boom')"))
    assert result.exit_code == 1 and "ValueError: boom" in result.stderr


@pytest.mark.parametrize("lang,source", [(50, "int main( { return 0; }"), (54, "int main() { undefined_thing; }")])
def test_compile_error(pool, lang, source):
    if lang not in AVAILABLE:
        pytest.skip("compiler not installed")
    result, events = pool.run(req(source, lang))
    assert result.outcome == "compile_error"
    assert "error" in result.compile_output
    assert "running" not in [e.get("stage") for e in events]


def test_compiler_options_are_split_without_shell(pool):
    if 50 not in AVAILABLE:
        pytest.skip("gcc not installed")
    src = '#include <stdio.h>\nint main(){ printf("%d %s\\n", VALUE, NAME); return 0; }'
    result, _ = pool.run(req(src, 50, compiler_options="-DVALUE=42 '-DNAME=\"a b\"' -O2"))
    assert (result.outcome, result.stdout) == ("exited", "42 a b\n")
    result, _ = pool.run(req(src, 50, compiler_options="-DVALUE=1 -DNAME=\"x\" ; touch /tmp/pwned"))
    assert result.outcome == "compile_error"  # ";" and "touch" reach gcc as plain arguments


def test_signals_are_reported(pool):
    if 50 not in AVAILABLE:
        pytest.skip("gcc not installed")
    cases = {11: "int main(){ volatile int *p = 0; return *p; }",
             8: "#include <signal.h>\nint main(){ raise(SIGFPE); return 0; }",  # some VMs don't trap on x/0
             6: "#include <stdlib.h>\nint main(){ abort(); }"}
    for sig, src in cases.items():
        result, _ = pool.run(req(src, 50))
        assert (result.outcome, result.exit_signal, result.exit_code) == ("exited", sig, None), result


def test_exec_format_error(pool):
    if 50 not in AVAILABLE:
        pytest.skip("gcc not installed")
    # "-c" makes ./main a relocatable object, not a program: it cannot be executed.
    result, _ = pool.run(req("int main(){ return 0; }", 50, compiler_options="-c"))
    assert result.outcome == "exec_format", result
    assert "cannot execute" in result.message


def test_limits_are_passed_and_enforced(pool):
    limits = Limits(cpu_time_limit=0.5, cpu_extra_time=0.5, wall_time_limit=3)
    result, _ = pool.run(req("while True: pass", limits=limits))
    assert result.outcome == "time_limit"
    assert result.time >= 0.5
    result, _ = pool.run(req("print('fine')", limits=limits))
    assert (result.outcome, result.stdout) == ("exited", "fine\n")


def test_non_utf8_output_survives(pool):
    result, _ = pool.run(req("import sys\nsys.stdout.buffer.write(b'ok \\xff\\xfe end\\n')"))
    assert result.stdout.encode("utf-8", "surrogateescape") == b"ok \xff\xfe end\n"


def test_concurrent_mixed_languages(pool):
    langs = [lang for lang in (71, 46, 50, 63) if lang in AVAILABLE]
    reqs = [req(HELLO[lang], lang, stdin=f"n{i}\n", command_line_arguments=str(i)) for i, lang in enumerate(langs * 3)]
    results = pool.run_many(reqs)
    assert [r.stdout for r in results] == [f"hello n{i} {i}\n" for i in range(len(reqs))]


def test_dead_kernel_is_replaced(pool):
    before = pool.engine.stats["kernels_replaced"]
    victim = next(iter(pool.engine._all))
    victim.km.provisioner.process.kill()
    results = pool.run_many([req(f"print({i})") for i in range(6)])
    outcomes = [r.outcome for r in results]
    assert outcomes.count("exited") >= 5  # at most the run on the dead kernel fails, as "internal"
    assert set(outcomes) <= {"exited", "internal"}
    wait_until(lambda: pool.engine.health()["kernels"] == 2)
    assert pool.engine.stats["kernels_replaced"] > before
    assert pool.engine.health()["kernels"] == 2
    assert pool.run(req("print('after')"))[0].stdout == "after\n"


def test_the_engine_decodes_kernel_messages_with_the_lean_session(pool):
    assert pool.engine._all and all(isinstance(k.km.session, LeanSession) for k in pool.engine._all)
    assert pool.run(req("print('lean')"))[0].stdout == "lean\n"


def test_kernels_are_recycled(tmp_path):
    with BlockingProgramRuns(1, recycle_after=2, runs_dir=str(tmp_path)) as pr:
        first = kernel_pids(pr)
        for i in range(3):
            assert pr.run(req(f"print({i})"))[0].stdout == f"{i}\n"

        def recycled() -> bool:  # past its runs it serves on until its successor is ready, then retires
            assert pr.run(req("print('on')"))[0].stdout == "on\n"
            return pr.engine.stats["kernels_replaced"] >= 1

        wait_until(recycled, timeout=60)
        assert kernel_pids(pr) != first
        pids = kernel_pids(pr)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids + first)


def test_interactive_stdin(pool):
    async def go():
        q: asyncio.Queue[str | None] = asyncio.Queue()
        events: list[dict] = []
        src = "import sys\nfor line in sys.stdin:\n    print('got', line.strip(), flush=True)\nprint('eof')"
        task = asyncio.ensure_future(pool.engine.run(req(src, stdin_queue=q), events.append))
        await q.put("one\n")
        for _ in range(200):
            if "got one" in "".join(e.get("text", "") for e in events):  # chunks may split lines
                break
            await asyncio.sleep(0.05)
        await q.put("two\n")
        await q.put(None)
        return await asyncio.wait_for(task, 30), events

    result, events = pool.submit(go())
    assert result.outcome == "exited" and result.stdout == "got one\ngot two\neof\n", result
    assert "got one\n" in "".join(e.get("text", "") for e in events)


def test_health_reports_mechanisms(pool):
    h = pool.engine.health()
    assert h["sandbox"] in ("bwrap", "unshare")
    assert h["limits"] in ("cgroup-v1", "cgroup-v2", "rlimit")
    assert h["kernels"] == 2 and 71 in h["languages"]


def test_stop_leaves_nothing(tmp_path):
    before = {c.pid for c in psutil.Process(os.getpid()).children(recursive=True)}
    pr = BlockingProgramRuns(2, runs_dir=str(tmp_path)).start()
    pr.run(req("print(1)"))
    pids = kernel_pids(pr)
    assert len(pids) == 2
    pr.stop()
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    children = psutil.Process(os.getpid()).children(recursive=True)
    # (kernels of the module's pool start their next run's sandbox at any time: not this engine's)
    assert not [c for c in children if c.pid not in before and c.status() != psutil.STATUS_ZOMBIE
                and not before & {p.pid for p in c.parents()}]


def test_no_free_kernel_is_an_internal_error(tmp_path):
    """Every kernel busy for KERNEL_WAIT: the run is an internal error (status 13), not a hang; the busy
    run is unharmed and its kernel serves the next run."""
    with BlockingProgramRuns(1, runs_dir=str(tmp_path)) as pr:
        pr.engine.KERNEL_WAIT = 1.0  # (the default is 120 s)

        async def go():
            q: asyncio.Queue[str | None] = asyncio.Queue()
            holder = asyncio.ensure_future(pr.engine.run(req("print('got', input())", stdin_queue=q), lambda e: None))
            while pr.engine.health()["idle"]:  # until the holder has the only kernel (it waits for stdin)
                await asyncio.sleep(0.01)
            starved = await pr.engine.run(req("print('never')"), lambda e: None)
            await q.put("x\n")
            await q.put(None)
            return starved, await asyncio.wait_for(holder, 60)

        starved, held = pr.submit(go())
        assert starved.outcome == "internal" and starved.stdout == "", starved
        assert starved.message == "no Run-Flare kernel became free within 1 s"
        assert held.outcome == "exited" and held.stdout == "got x\n", held
        assert pr.run(req("print('next')"))[0].stdout == "next\n"


def test_kernels_are_the_engines_own_spec_through_a_public_spec_manager(pool, tmp_path, monkeypatch):
    from jupyter_client.kernelspec import KernelSpec, NoSuchKernel

    from runflare_server.engine.jupyter.kernelspecs import StaticKernelSpecManager

    for k in pool.engine._all:
        assert k.km.kernel_spec.argv[1:3] == ["-m", "runflare_server.kernels"]
        assert k.km.kernel_spec.language == "runflare"
    # a spec of the same name installed on the host is never the one started
    fake = tmp_path / "kernels" / "runflare"
    fake.mkdir(parents=True)
    (fake / "kernel.json").write_text('{"argv": ["false"], "display_name": "x", "language": "x"}')
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    specs = StaticKernelSpecManager({"runflare": KernelSpec(argv=["true"], display_name="R", language="r")})
    assert specs.get_kernel_spec("runflare").argv == ["true"]
    assert set(specs.find_kernel_specs()) == {"runflare"} == set(specs.get_all_specs())
    with pytest.raises(NoSuchKernel):
        specs.get_kernel_spec("python3")
