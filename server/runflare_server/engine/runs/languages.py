"""The program-run language table, as data (like Judge0's), plus toolchain detection.

Commands are token lists. In them ``{compiler_options}`` / ``{args}`` expand to the shlex-split
options / arguments (never through a shell), ``{memory_bytes}`` to the run's memory limit, and a first
token naming a tool is resolved to its absolute path on the host. A language whose tools are missing
is not listed. Versions are probed once per process, all languages in parallel.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from runflare_server.engine.interface import LanguageInfo


@dataclass(frozen=True)
class Language:
    """One program language: how to compile and run a source file, and how to read its version."""

    id: int
    name: str  # template: "{version}" is the detected version
    source_file: str
    run_cmd: tuple[str, ...]
    version_cmd: tuple[str, ...]
    version_re: str
    kernelspec: str
    compile_cmd: tuple[str, ...] | None = None
    env: dict[str, str] = field(default_factory=dict)
    version_file: str | None = None  # read instead of running version_cmd: path relative to the tool's real dir


JAVA_FLAGS = ("-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Xshare:auto", "-XX:-UsePerfData")

LANGUAGES: tuple[Language, ...] = (
    Language(71, "Python ({version})", "script.py", ("python3", "script.py", "{args}"),
             ("python3", "--version"), r"Python (\S+)", "runflare-python",
             env={"PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1", "PYTHONUNBUFFERED": "1"}),
    Language(63, "JavaScript (Node.js {version})", "script.js", ("node", "script.js", "{args}"),
             ("node", "--version"), r"v(\S+)", "runflare-javascript"),
    Language(74, "TypeScript (Deno {version})", "script.ts",
             ("deno", "run", "--quiet", "--no-prompt", "--no-config", "--no-lock", "script.ts", "{args}"),
             ("deno", "--version"), r"deno (\S+)", "runflare-typescript",
             # Judge0 type-checks with tsc: a type error is a Compilation Error (6). `deno check` uses the
             # TypeScript bundled in the deno binary (no download, works offline); DENO_DIR is the sandbox's /tmp.
             compile_cmd=("deno", "check", "--quiet", "--no-config", "--no-lock", "{compiler_options}", "script.ts"),
             env={"DENO_DIR": "/tmp/deno", "NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1"}),
    Language(46, "Bash ({version})", "script.sh", ("bash", "script.sh", "{args}"),
             ("bash", "--version"), r"version (\d+\.\d+\.\d+)", "runflare-bash"),
    Language(50, "C (GCC {version})", "main.c", ("./main", "{args}"),
             ("gcc", "-dumpfullversion"), r"(\S+)", "runflare-c",
             compile_cmd=("gcc", "{compiler_options}", "-o", "main", "main.c", "-lm")),
    Language(54, "C++ (GCC {version})", "main.cpp", ("./main", "{args}"),
             ("g++", "-dumpfullversion"), r"(\S+)", "runflare-cpp",
             compile_cmd=("g++", "{compiler_options}", "-o", "main", "main.cpp")),
    Language(62, "Java (OpenJDK {version})", "Main.java",
             ("java", *JAVA_FLAGS, "-XX:MaxRAM={memory_bytes}", "-XX:MaxRAMPercentage=60", "Main", "{args}"),
             ("javac", "-version"), r'(?:javac |JAVA_VERSION=")([\d.]+)', "runflare-java",
             compile_cmd=("javac", *(f"-J{f}" for f in JAVA_FLAGS), "-J-Xmx256m", "{compiler_options}", "Main.java"),
             version_file="../release"),
    Language(73, "Rust ({version})", "main.rs", ("./main", "{args}"),
             ("rustc", "--version"), r"rustc (\S+)", "runflare-rust",
             compile_cmd=("rustc", "-C", "strip=debuginfo", "{compiler_options}", "-o", "main", "main.rs")),
    Language(60, "Go ({version})", "main.go", ("./main", "{args}"),
             ("go", "version"), r"go(\d+\.\d+(?:\.\d+)?)", "runflare-go",
             compile_cmd=("go", "build", "{compiler_options}", "-o", "main", "main.go"),
             env={"GOCACHE": "/tmp/go-cache", "GOPATH": "/tmp/go", "GO111MODULE": "off", "GOFLAGS": "-buildvcs=false",
                  "GOTELEMETRY": "off", "CGO_ENABLED": "0"}),
    Language(72, "Ruby ({version})", "script.rb", ("ruby", "script.rb", "{args}"),
             ("ruby", "--version"), r"ruby (\d+\.\d+\.\d+)", "runflare-ruby"),
    Language(85, "Perl ({version})", "script.pl", ("perl", "script.pl", "{args}"),
             ("perl", "-e", "print $^V"), r"v(\S+)", "runflare-perl"),
    Language(82, "SQL (SQLite {version})", "script.sql", ("sqlite3", "-batch", "db.sqlite", ".read script.sql"),
             ("sqlite3", "--version"), r"(\d+\.\d+\.\d+)", "runflare-sql"),
)
BY_ID = {lang.id: lang for lang in LANGUAGES}
SYSTEM_PREFIXES = ("/usr/", "/bin/", "/sbin/", "/lib/", "/lib64/", "/etc/")


def _which_rustc() -> str | None:
    """Prefer Debian's rustc; a rustup proxy is resolved to its toolchain's real rustc."""
    if os.path.exists("/usr/bin/rustc"):
        return "/usr/bin/rustc"
    proxy = shutil.which("rustc")
    if not proxy:
        return None
    try:
        sysroot = subprocess.run([proxy, "--print", "sysroot"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    real = Path(sysroot) / "bin" / "rustc"
    return str(real) if real.exists() else None


def _which_deno() -> str | None:
    try:
        from deno._find_deno import find_deno_bin  # the `deno` PyPI package

        return find_deno_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("deno")
        return found if found and "/shims/" not in found else None


def program_python() -> str:
    """The interpreter of Python program runs: RUNFLARE_PYTHON, else the system's python3 (a clean
    site-packages, ~10 ms to start), else the server's own interpreter."""
    chosen = os.environ.get("RUNFLARE_PYTHON")
    if chosen:
        return chosen
    return "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


@functools.cache
def tool_path(tool: str) -> str | None:
    """Absolute path of a tool on this host (the one programs will run), or None."""
    if tool == "python3":
        return os.path.realpath(program_python())
    if tool == "rustc":
        return _which_rustc()
    if tool == "deno":
        return _which_deno()
    found = shutil.which(tool, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/bin", "/usr/bin", "/bin"]))
    return os.path.realpath(found) if found else None


def _tools(lang: Language) -> list[str]:
    cmds = [lang.run_cmd] + ([lang.compile_cmd] if lang.compile_cmd else [])
    return [c[0] for c in cmds if not c[0].startswith("./")]


def available(lang: Language) -> bool:
    """Whether every tool the language needs is installed (gcc is needed to link Rust)."""
    needed = _tools(lang) + (["cc"] if lang.id == 73 else [])
    return all(tool_path(t) for t in needed)


def ro_paths(lang: Language) -> list[str]:
    """Host dirs outside the system dirs that the language's tools need (bound read-only in the sandbox)."""
    paths = []
    for tool in _tools(lang):
        real = tool_path(tool)
        if not real or real.startswith(SYSTEM_PREFIXES):
            continue
        bindir = Path(real).parent
        paths.append(str(bindir.parent if bindir.name == "bin" else bindir))
    if lang.id == 71 and os.path.realpath(program_python()) == os.path.realpath(sys.executable):
        paths += [sys.base_prefix, sys.prefix]
    return sorted({p for p in paths if not p.startswith(SYSTEM_PREFIXES)})


def tool_dirs(lang: Language) -> list[str]:
    """Dirs of the language's tools, put first on the program's PATH."""
    dirs = []
    for tool in _tools(lang):
        real = tool_path(tool)
        if real and str(Path(real).parent) not in dirs:
            dirs.append(str(Path(real).parent))
    return dirs


def expand(cmd: tuple[str, ...], *, compiler_options: list[str] = (), args: list[str] = (),
           memory_kb: int = 128_000) -> list[str]:
    """A command template made concrete: tool resolved, options/args spliced in as separate tokens."""
    out: list[str] = []
    for i, tok in enumerate(cmd):
        if tok == "{compiler_options}":
            out += list(compiler_options)
        elif tok == "{args}":
            out += list(args)
        elif i == 0 and not tok.startswith("./"):
            out.append(tool_path(tok) or tok)
        else:
            out.append(tok.replace("{memory_bytes}", str(memory_kb * 1024)))
    return out


def _display(cmd: tuple[str, ...] | None) -> str | None:
    if cmd is None:
        return None
    parts = [("%s" if t == "{compiler_options}" else "" if t == "{args}" else t) for t in cmd]
    if not cmd[0].startswith("./"):
        parts[0] = tool_path(cmd[0]) or cmd[0]
    return " ".join(p for p in parts if p)


def _version_from_file(lang: Language) -> str | None:
    real = tool_path(lang.version_cmd[0])
    if not (real and lang.version_file):
        return None
    try:
        text = (Path(real).parent / lang.version_file).resolve().read_text()
    except OSError:
        return None
    m = re.search(lang.version_re, text)
    return m.group(1) if m else None


@functools.cache
def probe_versions() -> dict[int, str]:
    """Language id → detected version, for available languages. Probes run in parallel, once per process."""
    procs: dict[int, subprocess.Popen[str]] = {}
    versions: dict[int, str] = {}
    for lang in LANGUAGES:
        if not available(lang):
            continue
        if v := _version_from_file(lang):
            versions[lang.id] = v
            continue
        try:
            procs[lang.id] = subprocess.Popen(expand(lang.version_cmd), stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
        except OSError:
            continue
    for lid, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            continue
        m = re.search(BY_ID[lid].version_re, out or "")
        if proc.returncode == 0 and m:
            versions[lid] = m.group(1)
    return versions


def language_infos() -> list[LanguageInfo]:
    """LanguageInfo for every program language available on this host, sorted by name."""
    versions = probe_versions()
    infos = [
        LanguageInfo(id=lang.id, name=lang.name.format(version=versions[lang.id]), source_file=lang.source_file,
                     compile_cmd=_display(lang.compile_cmd), run_cmd=_display(lang.run_cmd), kernel=lang.kernelspec)
        for lang in LANGUAGES if lang.id in versions
    ]
    return sorted(infos, key=lambda i: i.name)


def scripts_dir() -> str:
    """This interpreter's scripts dir (where pip put `deno`)."""
    return sysconfig.get_path("scripts")
