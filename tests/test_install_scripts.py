"""The README's two commands on a stock machine: scripts/serve.sh and scripts/test.sh with the system
interpreter (/usr/bin/python3, "externally managed" on Debian 12 / Ubuntu 24.04) first on PATH.

Bounded, not abridged: serve.sh runs whole but for `--install-only` (it stops after installing, the
kernelspecs and `runflare --help`, instead of serving), into a temporary venv ($RUNFLARE_VENV), with pip's
cache; test.sh then runs on that venv with a small pytest selection instead of the whole suite. Both
run install-system.sh as they would anywhere (here every apt package is present, so it installs nothing).
A client-only install (`pip install runflare`, no extras) is made the same way and used against a real
server. After each, the system interpreter's site-packages and the machine's and the user's kernelspec
directories are what they were.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import start_server

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def system_python_ok() -> str | None:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} does not exist"
    if not Path("/usr/bin/apt-get").exists():
        return "not a Debian/Ubuntu machine"
    return None


if reason := system_python_ok():
    pytestmark.append(pytest.mark.skip(reason=reason))


def script_env(venv: Path) -> dict[str, str]:
    """The environment of a user on a stock machine: the system python3 first on PATH (no pyenv shims,
    no active venv), pip's own configuration and cache kept."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYENV_VERSION", "CONDA_PREFIX", "PYTHONSTARTUP")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("RUNFLARE_")}
    env.update(PATH=SYSTEM_PATH, RUNFLARE_VENV=str(venv))
    return env


def system_state() -> dict[str, object]:
    """What installing must not change: the system interpreter's site directories (names and mtimes) and
    the kernelspecs outside any venv (the machine's and the user's)."""
    out = subprocess.run([SYSTEM_PYTHON, "-c", "import json, site; print(json.dumps("
                          "[*site.getsitepackages(), site.getusersitepackages()]))"],
                         capture_output=True, text=True, check=True, env={"PATH": SYSTEM_PATH})
    dirs = [Path(d) for d in json.loads(out.stdout)]
    dirs += [Path("/usr/share/jupyter/kernels"), Path("/usr/local/share/jupyter/kernels"),
             Path.home() / ".local/share/jupyter/kernels"]
    state: dict[str, object] = {}
    for d in dirs:
        if d.is_dir():
            state[str(d)] = sorted((p.name, p.stat().st_mtime_ns) for p in d.iterdir())
            for spec in d.glob("*/kernel.json"):
                state[str(spec)] = spec.read_text()
        else:
            state[str(d)] = None
    return state


def test_system_python_is_what_the_issue_describes() -> None:
    """Record the premise: on this machine /usr/bin/python3 refuses pip installs (PEP 668), so only a venv works."""
    version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys, sysconfig; print(sysconfig.get_path('stdlib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    if not (Path(version) / "EXTERNALLY-MANAGED").exists():
        pytest.skip(f"{SYSTEM_PYTHON} is not externally managed here")
    refused = subprocess.run([SYSTEM_PYTHON, "-m", "pip", "install", "--dry-run", "--no-index", "runflare"],
                             capture_output=True, text=True, env={"PATH": SYSTEM_PATH})
    assert refused.returncode != 0
    assert "externally-managed-environment" in refused.stderr or "No module named pip" in refused.stderr


@pytest.fixture(scope="module")
def served_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """serve.sh --install-only into a fresh venv, with the system python3 first on PATH."""
    venv = tmp_path_factory.mktemp("serve-sh") / "venv"
    before = system_state()
    out = subprocess.run(["bash", "scripts/serve.sh", "--install-only"], cwd=ROOT, env=script_env(venv),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr[-5000:]
    assert system_state() == before
    yield venv, out.stdout


def test_serve_sh_installs_into_a_venv_made_by_the_system_python(served_venv: tuple[Path, str]) -> None:
    venv, stdout = served_venv
    cfg = dict(line.split(" = ", 1) for line in (venv / "pyvenv.cfg").read_text().splitlines() if " = " in line)
    assert cfg["home"] == "/usr/bin"  # made by /usr/bin/python3, the first python3 on PATH
    assert cfg["include-system-site-packages"] == "false"
    # it says how to reach runflare, and that works
    assert f"{venv}/bin/runflare" in stdout and f"source {venv}/bin/activate" in stdout
    help_out = subprocess.run([venv / "bin" / "runflare", "--help"], capture_output=True, text=True, timeout=120)
    assert help_out.returncode == 0
    for command in ("serve", "run", "languages", "install-kernels"):
        assert command in help_out.stdout


def test_serve_sh_puts_the_kernelspecs_in_the_venv(served_venv: tuple[Path, str]) -> None:
    venv, _ = served_venv
    kernels = venv / "share" / "jupyter" / "kernels"
    names = {p.name for p in kernels.iterdir()}
    assert {"runflare-python", "runflare-c", "bash", "deno"} <= names
    argv = json.loads((kernels / "runflare-python" / "kernel.json").read_text())["argv"]
    assert argv[0] == str(venv / "bin" / "python")
    assert json.loads((kernels / "deno" / "kernel.json").read_text())["argv"][0] == str(venv / "bin" / "deno")
    # and the venv's Jupyter finds them there first
    found = subprocess.run([venv / "bin" / "python", "-c",
                            "import json; from jupyter_client.kernelspec import KernelSpecManager as K; "
                            "print(json.dumps(K().find_kernel_specs()))"],
                           capture_output=True, text=True, check=True, timeout=120, env={"PATH": SYSTEM_PATH})
    specs = json.loads(found.stdout)
    assert specs["deno"] == str(kernels / "deno") and specs["runflare-python"] == str(kernels / "runflare-python")


def test_install_kernels_user_and_prefix_are_opt_in(served_venv: tuple[Path, str], tmp_path: Path) -> None:
    venv, _ = served_venv
    prefix = tmp_path / "prefix"
    out = subprocess.run([venv / "bin" / "runflare", "install-kernels", "--prefix", str(prefix)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    names = {p.name for p in (prefix / "share" / "jupyter" / "kernels").iterdir()}
    assert {"runflare-python", "bash", "deno"} <= names
    # --user writes to the user's data dir: pointed at a temp home so the real one stays untouched
    home = tmp_path / "home"
    env = {"PATH": SYSTEM_PATH, "HOME": str(home)}
    out = subprocess.run([venv / "bin" / "runflare", "install-kernels", "--user"], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    names = {p.name for p in (home / ".local" / "share" / "jupyter" / "kernels").iterdir()}
    assert {"runflare-python", "bash", "deno"} <= names
    both = subprocess.run([venv / "bin" / "runflare", "install-kernels", "--user", "--prefix", str(prefix)],
                          capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_test_sh_installs_the_test_extra_and_runs_pytest_from_the_venv(served_venv: tuple[Path, str]) -> None:
    """test.sh on the same venv: installs the test extra there and runs pytest with the venv's python
    (the system python3 has no pytest), on a small selection."""
    venv, _ = served_venv
    before = system_state()
    out = subprocess.run(["bash", "scripts/test.sh", "tests/test_cli.py", "-q", "-p", "no:cacheprovider",
                          "-k", "help"], cwd=ROOT, env=script_env(venv), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    assert " passed" in out.stdout and "failed" not in out.stdout
    assert f"{venv}/bin/runflare" in out.stdout
    assert system_state() == before
    no_pytest = subprocess.run([SYSTEM_PYTHON, "-c", "import pytest"], capture_output=True,
                               env={"PATH": SYSTEM_PATH})
    assert no_pytest.returncode != 0  # so the suite above can only have run from the venv


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    server = start_server(tmp_path_factory.mktemp("auth-server"), "--auth-token", "s3cret")
    yield server
    server.stop()


def test_client_only_install_has_no_server_dependencies(tmp_path: Path, auth_server) -> None:
    """What a notebook user installs (`pip install runflare`, no extras): the client, magic, widget and
    `runflare run`, none of the server's dependencies; it runs a program on a real server with
    RUNFLARE_AUTH_TOKEN."""
    venv = tmp_path / "client-venv"
    before = system_state()
    env = script_env(venv)
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(venv)], check=True, env=env, timeout=300)
    pip = subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", "-e", str(ROOT)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert pip.returncode == 0, pip.stderr[-5000:]
    assert system_state() == before
    py = str(venv / "bin" / "python")
    check = subprocess.run([py, "-c", """
import importlib.util, sys
missing = [m for m in ("runflare_nb", "runflare_nb.magic", "runflare_nb.widget", "runflare_nb.async_client",
                       "runflare_nb.terminal") if importlib.util.find_spec(m) is None]
present = [m for m in ("pydantic", "pydantic_settings", "jupyter_client", "ipykernel", "pyseccomp")
           if importlib.util.find_spec(m) is not None]
import runflare_nb.magic, runflare_nb.widget, runflare_nb.async_client
print(missing, present)
"""], capture_output=True, text=True, timeout=120, env={"PATH": SYSTEM_PATH})
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "[] []"

    runflare = str(venv / "bin" / "runflare")
    serve = subprocess.run([runflare, "serve"], capture_output=True, text=True, timeout=60)
    assert serve.returncode == 2 and 'pip install "runflare[server,kernels]"' in serve.stderr

    program = tmp_path / "hello.py"
    program.write_text("print('hello from a client-only install')\n")
    run_env = {"PATH": SYSTEM_PATH, "HOME": str(tmp_path)}
    denied = subprocess.run([runflare, "run", str(program), "--server", auth_server.url], capture_output=True,
                            text=True, timeout=120, env=run_env)
    assert denied.returncode != 0
    ok = subprocess.run([runflare, "run", str(program), "--server", auth_server.url], capture_output=True,
                        text=True, timeout=120, env={**run_env, "RUNFLARE_AUTH_TOKEN": "s3cret"})
    assert ok.returncode == 0, ok.stderr
    assert "hello from a client-only install" in ok.stdout
