"""Describing untrusted data, and bounding what the operator holds of it.

One rule for every message built from what a tenant or a scheduler wrote (a
scheduler's reply or exception text, a map key it sent, a field of an object): the
text is cut to a small bound *before* anything else is done with it, and control
characters (newlines, escape sequences, bidi overrides) are escaped, so that it fits
on one line of a log, a status or an Event and costs little however big it was.

:func:`raise_recursion_limit` is the other half of "the operator survives any object
the API server accepts": the API server takes JSON nested up to 10,000 levels, and
kopf decodes (and diffs) what it watches with recursive code.
"""

from __future__ import annotations

import json
import json.scanner
import logging
import re
import sys
import threading
from typing import Any

logger = logging.getLogger(__name__)

#: Characters of an untrusted text kept by default
MAX_TEXT = 512

# C0 and C1 controls, DEL, line/paragraph separators, bidi embeddings and isolates
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    c = match.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def describe(value: Any, limit: int = MAX_TEXT) -> str:
    """``value`` (a text, or anything else by a bounded repr) as one line of at most
    ``limit`` characters: cut first, then control characters escaped; a cut text
    ends in "…" and says how long it was."""
    if not isinstance(value, str):
        value = bounded_repr(value, limit)
    total = len(value)
    text = _CONTROL.sub(_escape, value[:limit])
    if total <= limit and len(text) <= limit:
        return text
    note = f"… ({total} characters)"
    return text[: max(0, limit - len(note))] + note


def quoted(value: Any, limit: int = 64) -> str:
    """A name from untrusted data (a map key), quoted as ``repr`` would, bounded."""
    if isinstance(value, str):
        return "'" + describe(value, limit) + "'"
    return describe(value, limit)


def bounded_repr(value: Any, limit: int = MAX_TEXT) -> str:
    """``repr(value)`` of plain data without building more than about ``limit``
    characters of it, however big or deep ``value`` is (an iterative walk)."""
    out: list[str] = []
    size = 0
    # a stack of what is left to write: values, and closing text
    stack: list[tuple[bool, Any]] = [(True, value)]
    while stack and size <= limit:
        is_value, item = stack.pop()
        if not is_value:
            piece = item
        elif isinstance(item, dict):
            piece = "{"
            stack.append((False, "}"))
            entries = list(item.items())[: limit // 2 + 1]
            for i, (k, v) in reversed(list(enumerate(entries))):
                stack.append((True, v))
                stack.append((False, ": "))
                stack.append((True, k))
                if i:
                    stack.append((False, ", "))
        elif isinstance(item, (list, tuple)):
            opening, closing = ("[", "]") if isinstance(item, list) else ("(", ")")
            piece = opening
            stack.append((False, closing))
            entries = list(item[: limit // 2 + 1])
            for i, v in reversed(list(enumerate(entries))):
                stack.append((True, v))
                if i:
                    stack.append((False, ", "))
        elif isinstance(item, (str, bytes)):
            piece = repr(item[: limit + 1])
        elif item is None or isinstance(item, (bool, int, float)):
            piece = repr(item) if not isinstance(item, int) or item.bit_length() < 4 * limit else "<a huge int>"
        else:
            piece = f"<{type(item).__name__}>"
        out.append(piece)
        size += len(piece)
    text = "".join(out)
    return text if not stack else text[:limit] + "…"


#: JSON nesting the API server decodes (Go's encoding/json maxNestingDepth)
API_MAX_NESTING = 10_000
#: Python frames the recursive code that meets such an object may need: two per
#: level (``copy.deepcopy``, which kopf applies to what it watches), plus the frames
#: below it (the event loop, kopf's tasks)
RECURSION_LIMIT = 2 * API_MAX_NESTING + 5_000
#: Stack of threads started after start-up (a sync handler, an executor): as much
#: room as the main thread has and more; only touched pages cost memory
THREAD_STACK = 16 * 1024 * 1024


def raise_recursion_limit() -> None:
    """Let recursive code (kopf's JSON decoding, copies and diffs, reprs) go as deep
    as any object the API server accepts, without overflowing the C stack.

    Python-to-Python calls take no C stack in CPython 3.11; what does is recursion
    through C (the JSON decoder and encoder, ``repr``, ``==``, a generator resumed by
    ``yield from``: at most some 370 bytes a level, the last), and that nests once per
    level of the object: 10,000 levels take under 4 MiB of the 8 MiB main stack
    Linux and container runtimes give (tests/test_bounds.py checks it in a fresh
    interpreter). Only ever raised, never lowered."""
    if sys.getrecursionlimit() < RECURSION_LIMIT:
        sys.setrecursionlimit(RECURSION_LIMIT)
    try:
        if threading.stack_size() < THREAD_STACK:
            threading.stack_size(THREAD_STACK)
    except (ValueError, RuntimeError):  # a platform that does not let us: the default stays
        pass
    decode_as_deep_as_the_api_server()


def decode_as_deep_as_the_api_server(force_python: bool = False) -> bool:
    """Make ``json.loads`` (kopf's, aiohttp's) decode what the API server accepts.

    From CPython 3.12 the C decoder counts its nesting against a fixed C recursion
    limit that ``sys.setrecursionlimit`` does not raise; there, the standard library's
    pure-Python scanner (whose recursion is Python's, raised above) takes over for the
    default decoder. Probed, not assumed from the version. True when it took over."""
    deep = "[" * API_MAX_NESTING + "]" * API_MAX_NESTING
    if not force_python:
        try:
            json.loads(deep)
            return False
        except RecursionError:
            pass
    decoder = json._default_decoder  # what json.loads(text) uses
    decoder.scan_once = json.scanner.py_make_scanner(decoder)
    logger.info("JSON: the C decoder stops before %d levels; using the pure-Python scanner", API_MAX_NESTING)
    return True
