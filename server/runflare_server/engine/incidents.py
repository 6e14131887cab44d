"""What a submitter sees of a server failure: a short generic message and an incident id; the log keeps the rest.

``message = incident(log, "the kernel could not start", exc=e, detail=...)`` logs the exception (with its
traceback), the detail and the id, and returns ``"the kernel could not start (incident 3f9a1c2b7d04)"``.
The summary must be generic: never an exception's text, a path, a log tail or a traceback.
"""

from __future__ import annotations

import logging
import re
import secrets

# A message from the server's own side that is shown only when it matches one of these (user errors
# that carry nothing of the host); anything else an internal failure says goes to the log only.
SAFE_INTERNAL = (
    re.compile(r"cannot split arguments: [A-Za-z ]{1,80}"),
    re.compile(r"language -?\d{1,9} is not available( here)?"),
)
HOST_DETAIL = re.compile(r"Traceback|File \"|(?<![\w.~-])/(?!box\b)[\w.+@-]+/")


def incident(logger: logging.Logger, summary: str, *, exc: BaseException | None = None,
             detail: object = None) -> str:
    """Log a server-side failure in full under a fresh id; return ``"<summary> (incident <id>)"``."""
    iid = secrets.token_hex(6)
    logger.error("incident %s: %s; detail: %r", iid, summary, detail,
                 exc_info=(type(exc), exc, exc.__traceback__) if exc is not None else None)
    return f"{summary} (incident {iid})"


def shown_or_incident(logger: logging.Logger, summary: str, message: str | None) -> str | None:
    """``message`` of an internal failure when it is a known user-facing one, else an incident."""
    if message is None:
        return None
    if any(p.fullmatch(message) for p in SAFE_INTERNAL):
        return message
    return incident(logger, summary, detail=message)


def has_host_detail(text: str | None) -> bool:
    """Whether ``text`` looks like it carries a traceback or a host path (``/box`` is the sandbox's)."""
    return bool(text) and HOST_DETAIL.search(text) is not None
