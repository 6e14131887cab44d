"""The client side (runflare_nb) and the server side (runflare_server) never import each other; only the
`runflare` launcher (runflare_cli) knows both. And clients read one token variable, RUNFLARE_AUTH_TOKEN."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from runflare_nb import Client
from runflare_nb import _protocol as p

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "runflare_nb"
SERVER = ROOT / "server" / "runflare_server"
# What the server side needs and a client-only install does not have (psutil is not here: IPython 9,
# a client dependency, requires it).
SERVER_DEPENDENCIES = ("jupyter_client", "ipykernel", "pydantic", "pydantic_settings", "pyseccomp", "platformdirs")


def imported_names(path: Path) -> set[str]:
    """Every module a file imports: import statements (relative ones resolved) and constant
    importlib.import_module / __import__ calls."""
    tree = ast.parse(path.read_text(), str(path))
    package = path.parent
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays inside its own top-level package unless it climbs out
                base = package
                for _ in range(node.level - 1):
                    base = base.parent
                top = base if base.name else package
                names.add(f"<relative:{top}>")
            elif node.module:
                names.add(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                names.add(node.args[0].value)
    return names


def foreign_imports(package_dir: Path, forbidden: tuple[str, ...]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        names = imported_names(path)
        bad = {n for n in names if n.split(".")[0] in forbidden}
        # a relative import must not climb out of the package
        bad |= {n for n in names if n.startswith("<relative:") and not n[10:-1].startswith(str(package_dir))}
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    return found


def test_the_scan_sees_imports() -> None:
    """The scanner itself: it finds plain, from-, relative and importlib imports."""
    assert "runflare_nb.terminal" in imported_names(ROOT / "runflare_cli" / "__init__.py")
    assert "runflare_server.cli" in imported_names(ROOT / "runflare_cli" / "__init__.py")
    assert "tornado.httpclient" in imported_names(CLIENT / "async_client.py")


def test_client_side_never_imports_the_server_side() -> None:
    assert foreign_imports(CLIENT, ("runflare_server", "runflare_cli")) == {}


def test_server_side_never_imports_the_client_side() -> None:
    assert foreign_imports(SERVER, ("runflare_nb", "runflare_cli")) == {}


BLOCKER = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked by the test: {name}")
        return None
sys.meta_path.insert(0, Block())
"""


def run_blocked(blocked: tuple[str, ...], code: str) -> subprocess.CompletedProcess:
    script = BLOCKER + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script, ",".join(blocked)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_client_imports_without_the_server_or_its_dependencies() -> None:
    """Everything a notebook user touches imports with runflare_server and the server's dependencies absent."""
    out = run_blocked(("runflare_server", *SERVER_DEPENDENCIES), """
        import runflare_nb, runflare_nb.client, runflare_nb.async_client, runflare_nb.magic
        import runflare_nb.widget, runflare_nb.terminal, runflare_nb.languages
        from runflare_nb import Client, AsyncClient, SubmissionWidget
        assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED], sorted(sys.modules)
        print("client ok", flush=True)
        import runflare_cli
        try:
            runflare_cli.main(["run", "--help"])
        except SystemExit as exc:
            assert exc.code == 0
    """)
    assert out.returncode == 0, out.stderr
    assert "client ok" in out.stdout and "--language" in out.stdout


def test_launcher_without_the_server_says_what_to_install() -> None:
    out = run_blocked(("runflare_server", *SERVER_DEPENDENCIES), """
        import runflare_cli
        sys.exit(runflare_cli.main(["serve"]))
    """)
    assert out.returncode == 2
    assert 'pip install "runflare[server,kernels]"' in out.stderr


def test_server_imports_without_the_client() -> None:
    """Every server module (but the __main__ launchers) imports with runflare_nb absent."""
    out = run_blocked(("runflare_nb", "runflare_cli"), """
        import importlib, pkgutil, runflare_server
        names = [m.name for m in pkgutil.walk_packages(runflare_server.__path__, "runflare_server.")
                 if not m.name.endswith("__main__")]
        for name in names:
            importlib.import_module(name)
        assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        print(len(names), "server modules ok")
    """)
    assert out.returncode == 0, out.stderr
    assert "server modules ok" in out.stdout


# One token variable for clients: RUNFLARE_AUTH_TOKEN (the server's accepted list is RUNFLARE_AUTH_TOKENS).

def test_client_reads_runflare_auth_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNFLARE_TOKEN", raising=False)
    monkeypatch.setenv("RUNFLARE_AUTH_TOKEN", "s3cret")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Client("http://127.0.0.1:9").token == "s3cret"
        assert Client("http://127.0.0.1:9", "explicit").token == "explicit"
    monkeypatch.delenv("RUNFLARE_AUTH_TOKEN")
    assert Client("http://127.0.0.1:9").token is None


def test_old_token_variable_still_works_with_a_deprecation_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNFLARE_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RUNFLARE_TOKEN", "old")
    with pytest.warns(DeprecationWarning, match="RUNFLARE_AUTH_TOKEN"):
        assert Client("http://127.0.0.1:9").token == "old"
    monkeypatch.setenv("RUNFLARE_AUTH_TOKEN", "new")  # the new name wins, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert p.auth_token(None) == "new"


def test_no_other_token_variable_names_in_docs_and_examples() -> None:
    """Docs, examples and client code name RUNFLARE_AUTH_TOKEN (client) and RUNFLARE_AUTH_TOKENS (server);
    the old client name RUNFLARE_TOKEN appears only on lines that call it deprecated."""
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "examples").iterdir(),
             *CLIENT.glob("*.py")]
    offenders = [f"{f.relative_to(ROOT)}: {line.strip()}" for f in files if f.is_file()
                 for line in f.read_text(errors="replace").splitlines()
                 if "RUNFLARE_TOKEN" in line and "deprecat" not in line.lower()]
    assert offenders == []
    assert all("RUNFLARE_AUTH_TOKEN" in (ROOT / "examples" / name).read_text()
               for name in ("python_client.py", "curl-websocat.sh", "websocket-client.ts"))
