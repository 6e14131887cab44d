"""Language names, file extensions and Judge0 ids."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import PurePath
from typing import Any

from .errors import UnknownLanguage

ALIASES: dict[str, int] = {
    "python": 71, "py": 71, "python3": 71,
    "c++": 54, "cpp": 54, "cxx": 54,
    "js": 63, "javascript": 63, "node": 63, "nodejs": 63,
    "ts": 74, "typescript": 74,
    "c": 50,
    "java": 62,
    "rust": 73, "rs": 73,
    "go": 60, "golang": 60,
    "ruby": 72, "rb": 72,
    "perl": 85, "pl": 85,
    "bash": 46, "sh": 46, "shell": 46,
    "sql": 82, "sqlite": 82,
}

EXTENSIONS: dict[str, int] = {
    ".py": 71, ".c": 50, ".h": 50, ".cc": 54, ".cpp": 54, ".cxx": 54, ".c++": 54, ".hpp": 54,
    ".js": 63, ".mjs": 63, ".cjs": 63, ".ts": 74, ".java": 62, ".rs": 73, ".go": 60,
    ".rb": 72, ".pl": 85, ".sh": 46, ".bash": 46, ".sql": 82,
}


def guess_from_filename(filename: str) -> int | None:
    """The Judge0 id for a file's extension, or None."""
    return EXTENSIONS.get(PurePath(filename).suffix.lower())


def _normalise(name: str) -> str:
    return re.sub(r"\s*\(.*?\)\s*", " ", name).strip().lower()


def resolve(language: str | int, server_languages: Iterable[Mapping[str, Any]] | None = None) -> int:
    """Turn a name ("python", "c++"), an extension (".rs"), an id (71, "1071") or a server
    language name ("Python (3.11.7)", "Python 3 (IPython kernel)") into a language id."""
    if isinstance(language, bool):
        raise UnknownLanguage(f"not a language: {language!r}")
    if isinstance(language, int):
        return language
    text = str(language).strip()
    if text.isdigit():
        return int(text)
    key = text.lower()
    if key in ALIASES:
        return ALIASES[key]
    if key.startswith(".") and key in EXTENSIONS:
        return EXTENSIONS[key]
    found = _match_server(text, server_languages or [])
    if found is not None:
        return found
    raise UnknownLanguage(f"unknown language {language!r}; use a name like python, c++, js or a Judge0 id")


def _match_server(text: str, server_languages: Iterable[Mapping[str, Any]]) -> int | None:
    """Exact name first, then the name without its version, then a unique prefix."""
    langs = [(int(item["id"]), str(item.get("name", ""))) for item in server_languages]
    low = text.lower()
    for lid, name in langs:
        if name.lower() == low:
            return lid
    wanted = _normalise(text)
    for lid, name in langs:
        if _normalise(name) == wanted:
            return lid
    prefixed = [lid for lid, name in langs if name.lower().startswith(low)]
    return prefixed[0] if len(prefixed) == 1 else None
