"""Per-kernel-family behaviour (engine/jupyter/adapters.py): which family a kernelspec belongs to, and what each does."""

from __future__ import annotations

import sys
import types

import pytest
from conftest import skip_or_fail

from runflare_server.engine.interface import Limits, RunRequest
from runflare_server.engine.jupyter.adapters import (
    BashKernel,
    DenoKernel,
    KernelAdapter,
    PythonKernel,
    adapter_for,
)
from runflare_server.engine.jupyter.kernel_pool import installed_kernelspecs, load_spec
from runflare_server.engine.sandbox import kernel_sandbox as sb

IPYKERNEL = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
DENO = ["/usr/local/bin/deno", "jupyter", "--kernel", "--conn", "{connection_file}"]
BASH = [sys.executable, "-m", "bash_kernel", "-f", "{connection_file}"]


def req(code: str = "echo hi", **kw) -> RunRequest:
    return RunRequest(token="t", source_code=code, language_id=1046, limits=Limits(), **kw)


@pytest.mark.parametrize(("argv", "language", "family"), [
    (IPYKERNEL, "python", PythonKernel), (["/opt/py/bin/python", "-m", "ipykernel", "-f", "x"], "python", PythonKernel),
    (["xpython", "-f", "x"], "python", PythonKernel), (DENO, "typescript", DenoKernel),
    (BASH, "bash", BashKernel), (["/usr/bin/ir", "-f", "x"], "R", KernelAdapter), ([], "", KernelAdapter)])
def test_family_by_argv_and_language(argv: list[str], language: str, family: type) -> None:
    assert type(adapter_for(argv, language)) is family


def test_installed_kernelspecs_get_their_family() -> None:
    specs = installed_kernelspecs()
    expected = {"python3": "python", "deno": "deno", "bash": "bash"}
    for name, family in expected.items():
        if name not in specs:
            skip_or_fail(f"kernelspec {name} is not installed (runflare kernels install)")
        assert load_spec(name).adapter.family == family


def test_ipykernel_start_up() -> None:
    a = adapter_for(IPYKERNEL, "python")
    assert a.forkable and not a.tcp_only and not a.drains_after_idle
    assert "--HistoryManager.enabled=False" in a.lean_args()
    assert not adapter_for([sys.executable + "-other", *IPYKERNEL[1:]], "python").forkable  # another interpreter
    assert adapter_for(["xpython", "-f", "x"], "python").lean_args() == []
    assert sb.forkable(IPYKERNEL) and not sb.forkable(BASH)
    spec = load_spec("python3")
    assert spec.argv[-len(PythonKernel.LEAN_ARGS):] == PythonKernel.LEAN_ARGS


def test_deno_is_bridged_and_drained() -> None:
    a = adapter_for(DENO, "typescript")
    assert a.tcp_only and a.drains_after_idle and not a.forkable and a.lean_args() == []
    assert sb.needs_bridge(DENO) and not sb.needs_bridge(IPYKERNEL)
    pre = a.preamble(req("console.log(1)", stdin="a\nb", command_line_arguments="x 'y z'"), "script.ts")
    assert '["x", "y z"]' in pre and '"a\\nb"' in pre


def test_python_set_up_travels_with_the_code_and_the_warm_up_defines_it() -> None:
    a = adapter_for(IPYKERNEL, "python")
    request = req(stdin="5\n", command_line_arguments="-v 'two words'")
    assert a.preamble(request, "script.py") is None  # no set-up cell: one execute request per run
    assert a.setup(request, "script.py") == {"data": "5\n", "argv": ["script.py", "-v", "two words"],
                                             "interactive": False, "cap": request.limits.max_output_bytes}
    warmup = a.warmup()
    namespace: dict = {}
    module = sys.modules["_rf_setup"] = types.ModuleType("_rf_setup")
    exec(compile(warmup.splitlines()[1], "<warm-up>", "exec"), namespace)  # defines it out of the user's namespace
    assert set(namespace) == {"__builtins__"} and callable(module._rf_setup) and callable(module._rf_install)
    assert sys.modules.pop("_rf_setup") is module


def test_bash_wraps_the_program_with_argv_and_stdin() -> None:
    a = adapter_for(BASH, "bash")
    code = a.code(req("read x; echo $x $1; exit 3", stdin="in", command_line_arguments="'a b' c"))
    assert code.startswith("(\nset -- 'a b' c\nread x; echo $x $1; exit 3\n) <<'RF_STDIN_")
    end = code.split("<<'")[1].split("'")[0]
    assert code.endswith(f"\nin\n{end}")
    assert a.preamble(req(), "script.sh") is None
    assert adapter_for(IPYKERNEL, "python").code(req("print(1)")) == "print(1)"


def test_bash_exit_status_from_its_error_message() -> None:
    a = adapter_for(BASH, "bash")
    assert a.exit_status({"ename": "", "evalue": "3", "traceback": []}) == 3
    assert a.exit_status({"ename": "", "evalue": "-1", "traceback": []}) == 255
    assert a.exit_status({"ename": "Error", "evalue": "3", "traceback": []}) is None
    assert a.exit_status({"ename": "", "evalue": "oops", "traceback": []}) is None
    assert adapter_for(IPYKERNEL, "python").exit_status({"ename": "", "evalue": "3", "traceback": []}) is None


def test_launch_env_of_python_kernels_has_no_python_executable() -> None:
    env = {"PYTHONEXECUTABLE": "/x", "A": "1"}
    assert adapter_for(["xpython"], "python").launch_env(dict(env)) == {"A": "1"}
    assert adapter_for(BASH, "bash").launch_env(dict(env)) == env


def test_generic_version_name_is_the_display_name() -> None:
    assert adapter_for(["/usr/bin/ir"], "R").version_name("R", "R 4.3") == "R (R 4.3)"
