"""The operator's side of the amm_core scheduler plugin: plain-message RPC to a Dask
scheduler, with timeouts, typed errors and a wire reader that accepts plain data only.

Every call opens one TCP connection to the scheduler, does distributed's handshake,
sends one message and reads one reply; ``timeout`` seconds bound the whole exchange,
connect included. What can go wrong is told apart so that the operator can act on it:

- :class:`SchedulerUnreachable`: no connection, a dropped connection, or no answer in
  time (``refused`` when nothing listens: a scheduler starting or gone). Try later.
- :class:`SchedulerProtocolError`: the scheduler sent something the strict reader
  refuses (below). The message says what, where, and in which exchange.
- :class:`PluginMissing`: the scheduler answers but has no amm_core plugin (an unknown
  handler makes distributed answer ``None``); :func:`ensure_plugin` installs it.
- :class:`ApplyRejected`: the plugin refused the config; ``message`` is its
  ``ValueError`` text, meant to be shown to the user as is.
- :class:`SchedulerCallFailed`: anything else raised on the scheduler.

Why a reader of our own. Whoever can create a DaskCluster controls its scheduler, and
the operator holds cluster-wide Kubernetes credentials. distributed's own comms are no
boundary: ``distributed.protocol.loads`` runs ``pickle.loads`` on any ``__Pickled__``
frame whatever ``deserialize=`` says, while the comm reads the message, the connect
handshake included. So this module speaks distributed's TCP framing itself (asyncio
streams; ``distributed.comm.connect`` and ``Comm.read`` are never used) and decodes
what the scheduler sends with a strict msgpack reader:

- accepted: nil, bool, int, float, str (UTF-8), bytes, arrays (as lists) and maps
  whose keys are str; nothing else is ever built from scheduler bytes;
- refused: msgpack ext types (and the reserved byte), any map holding one of
  distributed's placeholder keys (``__Pickled__``, ``__Serialized__``, ``__Enum__``,
  ``__Set__``), non-str map keys, duplicate keys, invalid UTF-8, trailing or missing
  bytes, and a message of more than one frame (extra frames only ever carry what such
  placeholders point to);
- bounds, checked from the length prelude before anything is read or allocated:
  at most :data:`MAX_FRAMES` frames and :data:`MAX_MESSAGE_BYTES` bytes in all (each
  frame included); then at most :data:`MAX_DEPTH` nested containers and
  :data:`MAX_VALUES` values in a message (a 16 MiB message of empty maps would
  otherwise cost more than 1 GB of Python objects).

One exception: a distributed error reply (``status`` "uncaught-error" or "error")
carries the remote exception and traceback pickled, as ``{"__Serialized__": n}`` in
its ``exception`` and ``traceback`` fields. There, and only there, such a placeholder
is read as ``None`` and the frames it points to are read (within the bounds) but never
decoded; the error is known by its ``exception_text`` (the remote ``repr``), from which
the type name and message are parsed with :func:`ast.literal_eval`. The same
placeholder anywhere else, or in a message that is not an error reply, is refused.

Compression. Our handshake announces ``compression: None``, so the scheduler settles
on no compression (``Comm.handshake_configuration`` keeps a setting only when both
sides announce the same). distributed never compresses the msgpack frame of a message
anyway, only the sub-frames of pickled or serialized objects, which are refused or,
in an error reply, left undecoded: no decompressor ever runs on scheduler bytes.

What we send is plain msgpack too. Only :func:`ensure_plugin` ships pickles, and only
to the scheduler: its ``register_scheduler_plugin`` handler takes pickled plugins and
nothing else. TLS (``tls://`` addresses) is out of scope: refused with an error.

Live install. When the scheduler's image lacks amm_core, :func:`ensure_plugin` zips
the amm_core package the operator itself runs (``*.py`` only, with fixed timestamps
so that the file name's content hash is stable) and registers distributed's own
:class:`~distributed.diagnostics.plugin.SchedulerUploadFile` with it: the scheduler
writes the zip into its local directory, puts it on ``sys.path`` and imports
amm_core from it (``Server.upload_file``, the mechanism behind
``Client.upload_file``). Then it registers :class:`amm_core.plugin.MemoryPolicyPlugin`,
pickled by reference, so that the scheduler imports the class from the uploaded (or
its own) amm_core. Policy classes named ``amm_core.*`` in a config are importable on
the scheduler afterwards. When amm_core is importable there already, only the plugin
is registered.

Version skew. The plugin reports ``amm_core_digest`` (``amm_core.source_digest()``,
a hash of the code it runs). A *live* plugin whose digest differs from the
operator's own is replaced by :func:`ensure_plugin`: the operator's zip is uploaded
again and the plugin registered with ``idempotent=False``, so that the new object's
``start()`` takes over the handlers and the AMM extension (the scheduler does not
close the old object; its counting wrappers stay in the chain, harmless). Policy
objects of the old code do not survive: the next apply builds them from the new code.
distributed's ``import_file`` reloads only ``amm_core/__init__``, so the zip carries
one more top-level module (:data:`RELOAD_MODULE`) that puts the zip first on
``sys.path`` and makes the scheduler forget every ``amm_core`` module, so that all of
them are imported anew from the zip. A *preloaded* plugin (``source: preload``) is
never replaced: the image owns it; :func:`skew` tells the caller in a sentence.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import hashlib
import io
import itertools
import re
import struct
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgpack
from distributed.comm import parse_address, parse_host_port
from distributed.diagnostics.plugin import SchedulerUploadFile
from distributed.protocol.pickle import HIGHEST_PROTOCOL, dumps

import amm_core
from amm_core.plugin import PLUGIN_NAME, MemoryPolicyPlugin

#: Seconds a call may take, connect included, unless a call says otherwise (the
#: operator passes its --rpc-timeout)
DEFAULT_TIMEOUT = 5.0

#: Bytes of frames one message may announce in its length prelude, all frames
#: together (a status is a few kB; a large cluster's some 100 kB)
MAX_MESSAGE_BYTES = 4 * 2**20
#: Frames one message may announce (a plain message has one; an error reply a few)
MAX_FRAMES = 16
#: Containers (arrays, maps) nested in one another, the outermost included
MAX_DEPTH = 32
#: Values (scalars, containers, map keys) in one message
MAX_VALUES = 50_000
#: Characters of a remote exception_text that are parsed (distributed truncates
#: exceptions to distributed.admin.max-error-length, 10,000 by default)
MAX_ERROR_TEXT = 20_000

#: Status values of distributed's error replies (core.error_message)
ERROR_STATUSES = ("uncaught-error", "error")
#: Fields of an error reply that hold pickles, read as None and never decoded
OPAQUE_ERROR_FIELDS = frozenset({"exception", "traceback"})
#: distributed's placeholder keys, and what each stands for
PLACEHOLDER_KEYS = {
    "__Pickled__": "a pickled object (__Pickled__)",
    "__Serialized__": "a serialized object (__Serialized__)",
    "__Enum__": "an enum placeholder (__Enum__, imported by name)",
    "__Set__": "a set placeholder (__Set__)",
}
#: The placeholders an error reply's opaque fields may hold
PICKLE_KEYS = ("__Pickled__", "__Serialized__")

#: What we tell the scheduler about ourselves, as a distributed client does
#: (Comm.handshake_info), but never wanting compression
HANDSHAKE = {
    "compression": None,
    "python": tuple(sys.version_info)[:3],
    "pickle-protocol": HIGHEST_PROTOCOL,
}


class SchedulerRPCError(Exception):
    """Base class of the errors of this module."""


class SchedulerUnreachable(SchedulerRPCError):
    """No connection to the scheduler, or no answer within the timeout."""

    #: Nothing listens at the address (a scheduler still starting, or crashed),
    #: as opposed to a scheduler that does not answer
    refused: bool

    def __init__(self, message: str, *, refused: bool = False):
        super().__init__(message)
        self.refused = refused


class SchedulerProtocolError(SchedulerRPCError):
    """The scheduler sent something other than plain, bounded msgpack (a pickle, an
    ext type, too much, too deep...); it was refused before anything was built from
    it. Nothing of that exchange is used."""


class PluginMissing(SchedulerRPCError):
    """The scheduler has no amm_core plugin."""


class ApplyRejected(SchedulerRPCError):
    """The plugin refused the config. ``message`` is the scheduler's ValueError text."""

    message: str

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class SchedulerCallFailed(SchedulerRPCError):
    """The scheduler raised something else. ``remote_type`` is the remote exception's
    class name ("" when unknown) and ``remote_message`` its message."""

    remote_type: str
    remote_message: str

    def __init__(self, message: str, remote_type: str, remote_message: str):
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_message = remote_message


# --- the strict reader --------------------------------------------------------


class Refused(Exception):
    """What the strict reader refused (``reason``) and where in the message
    (``path``, outermost first)."""

    reason: str
    path: list[str | int]

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
        self.path = []

    def describe(self) -> str:
        if not self.path:
            return self.reason
        return self.reason + " at " + "".join(f"[{p!r}]" for p in self.path)


_CONSTANTS: dict[int, Any] = {0xC0: None, 0xC2: False, 0xC3: True}
_NUMBERS = {
    0xCA: struct.Struct(">f"),
    0xCB: struct.Struct(">d"),
    0xCC: struct.Struct(">B"),
    0xCD: struct.Struct(">H"),
    0xCE: struct.Struct(">I"),
    0xCF: struct.Struct(">Q"),
    0xD0: struct.Struct(">b"),
    0xD1: struct.Struct(">h"),
    0xD2: struct.Struct(">i"),
    0xD3: struct.Struct(">q"),
}
# type byte -> (kind, struct of its length)
_SIZED = {
    0xC4: ("bin", struct.Struct(">B")),
    0xC5: ("bin", struct.Struct(">H")),
    0xC6: ("bin", struct.Struct(">I")),
    0xD9: ("str", struct.Struct(">B")),
    0xDA: ("str", struct.Struct(">H")),
    0xDB: ("str", struct.Struct(">I")),
    0xDC: ("array", struct.Struct(">H")),
    0xDD: ("array", struct.Struct(">I")),
    0xDE: ("map", struct.Struct(">H")),
    0xDF: ("map", struct.Struct(">I")),
}
_EXT = frozenset({0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8})


class PlainReader:
    """Decodes one msgpack value into plain Python data, refusing everything else
    (see the module docstring). Builds nothing but str, bytes, int, float, bool,
    None, list and dict; raises :class:`Refused`.

    With ``opaque_fields``, a top-level map's value under one of these keys may be a
    lone ``{"__Pickled__" | "__Serialized__": int}`` placeholder: it reads as None
    and is listed in ``opaque`` (the caller decides whether that is allowed)."""

    def __init__(self, data: bytes, opaque_fields: frozenset[str] = frozenset()):
        self.data = data
        self.pos = 0
        self.values = 0
        self.opaque_fields = opaque_fields
        #: Placeholders read as None: Refused errors, should the caller refuse them
        self.opaque: list[Refused] = []

    def read(self) -> Any:
        value = self._value(0)
        if self.pos != len(self.data):
            raise Refused(f"{len(self.data) - self.pos} bytes after the message")
        return value

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise Refused("a truncated message")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def _unpack(self, fmt: struct.Struct) -> Any:
        (value,) = fmt.unpack(self._take(fmt.size))
        return value

    def _value(self, depth: int, opaque_field: str | None = None) -> Any:
        """The next value, ``depth`` containers deep. ``opaque_field``: the top-level
        key it is the value of, when that value may be an opaque placeholder."""
        self.values += 1
        if self.values > MAX_VALUES:
            raise Refused(f"more than {MAX_VALUES} values")
        b = self._take(1)[0]
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if b <= 0x8F:
            return self._map(b & 0x0F, depth, opaque_field)
        if b <= 0x9F:
            return self._array(b & 0x0F, depth)
        if b <= 0xBF:
            return self._str(b & 0x1F)
        if b in _CONSTANTS:
            return _CONSTANTS[b]
        if b in _NUMBERS:
            return self._unpack(_NUMBERS[b])
        if b in _SIZED:
            kind, length = _SIZED[b]
            n = self._unpack(length)
            if kind == "bin":
                return self._take(n)
            if kind == "str":
                return self._str(n)
            if kind == "array":
                return self._array(n, depth)
            return self._map(n, depth, opaque_field)
        if b in _EXT:
            raise Refused("a msgpack extension type (ext)")
        raise Refused(f"the reserved msgpack byte 0x{b:02x}")

    def _str(self, n: int) -> str:
        try:
            return self._take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise Refused("a string that is not UTF-8") from None

    def _enter(self, depth: int) -> int:
        if depth >= MAX_DEPTH:
            raise Refused(f"containers nested more than {MAX_DEPTH} deep")
        return depth + 1

    def _array(self, n: int, depth: int) -> list[Any]:
        inner = self._enter(depth)
        out = []
        for i in range(n):
            try:
                out.append(self._value(inner))
            except Refused as e:
                e.path.insert(0, i)
                raise
        return out

    def _map(
        self, n: int, depth: int, opaque_field: str | None = None
    ) -> dict[str, Any] | None:
        inner = self._enter(depth)
        out: dict[str, Any] = {}
        for _ in range(n):
            key = self._value(inner)
            if not isinstance(key, str):
                raise Refused(f"a map key of type {type(key).__name__}")
            if key in out:
                raise Refused(f"the map key {key!r} twice")
            if key in PLACEHOLDER_KEYS:
                # Refused at its key: what it points to is never looked at
                return self._opaque(key, n, inner, opaque_field)
            field = key if depth == 0 and key in self.opaque_fields else None
            try:
                out[key] = self._value(inner, field)
            except Refused as e:
                e.path.insert(0, key)
                raise
        return out

    def _opaque(self, key: str, n: int, depth: int, field: str | None) -> None:
        """A placeholder map at ``key``: refused, unless it is a lone pickle
        placeholder (``{key: frame index}``) where an opaque value may stand."""
        refused = Refused(PLACEHOLDER_KEYS[key])
        if field is None or n != 1 or key not in PICKLE_KEYS:
            raise refused
        if type(self._value(depth)) is not int:
            raise refused
        refused.path.append(field)
        self.opaque.append(refused)
        return None


def read_plain(data: bytes, opaque_fields: frozenset[str] = frozenset()) -> Any:
    """One plain msgpack value from ``data`` (see :class:`PlainReader`), with the
    opaque placeholders allowed only in an error reply."""
    reader = PlainReader(data, opaque_fields)
    value = reader.read()
    if reader.opaque and not is_error_reply(value):
        raise reader.opaque[0]
    return value


def is_error_reply(value: Any) -> bool:
    return isinstance(value, dict) and value.get("status") in ERROR_STATUSES


# --- framing ------------------------------------------------------------------


async def read_frames(reader: asyncio.StreamReader) -> list[bytes]:
    """One message's frames, as distributed's TCP comm writes them: a u64 count of
    bytes "not to split" (prelude included), the prelude (u64 frame count, u64 length
    of each frame), then the frames; u64s in native byte order, as distributed packs
    them. Bounds are checked before the frames are read."""
    nosplit, nframes = struct.unpack("QQ", await reader.readexactly(16))
    if not 1 <= nframes <= MAX_FRAMES:
        raise Refused(f"a message of {nframes} frames (limit {MAX_FRAMES})")
    lengths = struct.unpack(f"{nframes}Q", await reader.readexactly(8 * nframes))
    total = sum(lengths)
    if total > MAX_MESSAGE_BYTES:
        raise Refused(
            f"a message of {total} bytes (frames of {', '.join(map(str, lengths))} "
            f"bytes; limit {MAX_MESSAGE_BYTES} in all)"
        )
    bounds = list(itertools.accumulate(lengths, initial=0))
    # distributed reads the first `nosplit` bytes at once: they end on a frame boundary
    if nosplit - 8 * (1 + nframes) not in bounds:
        raise Refused("a frame header that does not match its frame lengths")
    data = await reader.readexactly(total)
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


def frame(msg: Any) -> bytes:
    """``msg`` as one plain msgpack frame in distributed's TCP framing. Raises
    TypeError for anything msgpack cannot carry as is (nothing is pickled here)."""
    payload = msgpack.packb(msg, use_bin_type=True)
    prelude = struct.pack("QQ", 1, len(payload))
    return struct.pack("Q", len(prelude) + len(payload)) + prelude + payload


async def read_message(
    reader: asyncio.StreamReader, opaque_fields: frozenset[str] = frozenset()
) -> Any:
    """One plain message; raises Refused for anything else. Frames beyond the first
    are allowed only in an error reply (they hold what its opaque placeholders point
    to) and are never decoded."""
    frames = await read_frames(reader)
    value = read_plain(frames[0], opaque_fields)
    if len(frames) > 1 and not is_error_reply(value):
        raise Refused(f"a message of {len(frames)} frames (a plain message has one)")
    return value


# --- one call -----------------------------------------------------------------


#: Characters of a remote exception's class name kept
MAX_ERROR_NAME = 200


def parse_exception_text(text: str) -> tuple[str, str]:
    """(class name, message) from distributed's ``exception_text``, which is
    ``repr(exception)``, e.g. ``ValueError('bad')`` -> ("ValueError", "bad"). The text
    comes from the scheduler: it is cut to its bounds first, and whatever it makes
    the parser do, the answer is two bounded strings."""
    match = re.fullmatch(rf"([\w.]{{1,{MAX_ERROR_NAME}}})\((.*)\)", text, re.DOTALL)
    if match is None:
        return "", text[:MAX_ERROR_TEXT]
    name, args_text = match.groups()
    if len(args_text) > MAX_ERROR_TEXT:
        return name, args_text[:MAX_ERROR_TEXT]
    try:
        args = ast.literal_eval(f"({args_text},)") if args_text else ()
        message = ", ".join(a if isinstance(a, str) else repr(a) for a in args)
    # What a crafted text can make the parser (or int's repr) raise; it is then
    # shown as it is
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return name, args_text
    return name, message[:MAX_ERROR_TEXT]


def tcp_host_port(address: str) -> tuple[str, int]:
    scheme, location = parse_address(address)
    if scheme != "tcp":
        raise SchedulerRPCError(
            f"scheduler address {address}: only tcp:// is supported (no TLS)"
        )
    host, port = parse_host_port(location)
    return host, port


async def _call(address: str, op: str, *, timeout: float | None, **msg: Any) -> Any:
    """Send one message to the scheduler and return its (plain) answer. With
    ``close``, the scheduler closes the connection after replying."""
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    host, port = tcp_host_port(address)
    request = frame({"op": op, "reply": True, "close": True, **msg})
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _open(address, host, port)
            try:
                reply = await _exchange(reader, writer, address, op, request)
            finally:
                # Nothing more is read from or sent to this scheduler
                writer.transport.abort()
    except TimeoutError:
        raise SchedulerUnreachable(
            f"scheduler {address} unreachable or did not answer {op!r} within {timeout}s"
        ) from None
    if is_error_reply(reply):
        raise remote_error(reply, address, op)
    return reply


async def _open(
    address: str, host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.open_connection(host, port)
    except ConnectionRefusedError:
        raise SchedulerUnreachable(
            f"nothing listens at {address} (scheduler starting or down)", refused=True
        ) from None
    except OSError as e:  # unresolvable, unreachable network...
        raise SchedulerUnreachable(f"scheduler {address} unreachable: {e}") from None


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    address: str,
    op: str,
    request: bytes,
) -> Any:
    """Handshakes (ours out, theirs read strictly before anything else is sent), then
    the framed ``request`` out and its reply in."""
    try:
        writer.write(frame(HANDSHAKE))
        try:
            theirs = await read_message(reader)
        except Refused as e:
            raise _protocol_error(address, e, "handshake") from None
        if not isinstance(theirs, dict):
            raise _protocol_error(address, Refused("a non-map"), "handshake")
        writer.write(request)
        await writer.drain()
        try:
            return await read_message(reader, OPAQUE_ERROR_FIELDS)
        except Refused as e:
            raise _protocol_error(address, e, f"reply to {op!r}") from None
    except (OSError, asyncio.IncompleteReadError) as e:
        raise SchedulerUnreachable(
            f"connection to scheduler {address} lost during {op!r}: "
            f"{type(e).__name__}: {e}"
        ) from None


def _protocol_error(address: str, refused: Refused, where: str) -> SchedulerProtocolError:
    return SchedulerProtocolError(
        f"scheduler {address} sent {refused.describe()} in its {where}; refused"
    )


def remote_error(reply: dict[str, Any], address: str, op: str) -> SchedulerCallFailed:
    """The error of a distributed error reply, from its plain ``exception_text``."""
    text = reply.get("exception_text")
    name, message = parse_exception_text(text if isinstance(text, str) else "")
    return SchedulerCallFailed(
        f"{op!r} failed on scheduler {address}: {name}: {message}", name, message
    )


# --- the plugin's handlers ----------------------------------------------------


async def _plugin_call(
    address: str, op: str, *, timeout: float | None, **msg: Any
) -> dict[str, Any]:
    answer = await _call(address, op, timeout=timeout, **msg)
    if answer is None:
        raise PluginMissing(f"scheduler {address} has no amm_core plugin")
    if not isinstance(answer, dict):
        raise SchedulerCallFailed(
            f"scheduler {address} answered {op!r} with a {type(answer).__name__}, "
            "not a map",
            "",
            "",
        )
    return checked_status(address, op, answer)


# --- the status's shape ---------------------------------------------------------

#: Characters of a name or word in a status (class paths, measures, uids, versions)
MAX_STATUS_TEXT = 256
#: Entries of a list in a status (policies, workers to replace, retirements)
MAX_STATUS_ITEMS = 1000


class _Shape:
    """What a field of the plugin's status must be. The reader already refused
    everything that is not plain data; this refuses plain data of the wrong shape or
    size, which would otherwise break the operator's pass, or the policy's status
    patch (the CRD's enums, etcd's size limit), for every cluster of the policy."""

    def __init__(self, check: Any, what: str):
        self.check = check
        self.what = what


def _text(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= MAX_STATUS_TEXT


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
        and abs(value) < 2**63


def _optional(check: Any) -> Any:
    return lambda value: value is None or check(value)


def _list_of(check: Any) -> Any:
    return lambda value: isinstance(value, list) and len(value) <= MAX_STATUS_ITEMS and all(map(check, value))


def _map_with(fields: dict[str, Any]) -> Any:
    """A map whose listed fields, where present, pass their checks."""
    return lambda value: isinstance(value, dict) and all(
        check(value[k]) for k, check in fields.items() if k in value
    )


_OWNER = _map_with({"uid": _text, "namespace": _text, "name": _text, "generation": _number})
_POLICY_ENTRY = _map_with({"class": _text, "role": _text})
_REPLACE_ENTRY = _map_with({"name": _optional(_text), "address": _text, "retired": lambda v: isinstance(v, bool)})
_AMM = _map_with({
    "running": lambda v: isinstance(v, bool),
    "interval": _number,
    "measure": _text,
    "policies": _list_of(_POLICY_ENTRY),
    "cycles": _number,
    "replicas_copied": _number,
    "replicas_dropped": _number,
    "memory_bytes": _number,
    "retiring_workers": _list_of(_text),
})
#: The fields of the plugin's status the operator reads, and what each must be
STATUS_SHAPE: dict[str, _Shape] = {
    "source": _Shape(lambda v: v in ("preload", "live"), '"preload" or "live"'),
    "owner": _Shape(_optional(_OWNER), "null or an owner {uid, namespace, name, generation}"),
    "in_force": _Shape(lambda v: isinstance(v, bool), "true or false"),
    "amm": _Shape(_optional(_AMM), "null or the AMM's report"),
    "workers": _Shape(_number, "a number"),
    "replace": _Shape(_list_of(_REPLACE_ENTRY), "a list of workers to replace"),
    "amm_core_version": _Shape(_optional(_text), "null or a version"),
    "amm_core_digest": _Shape(_optional(_text), "null or a digest"),
    "error": _Shape(_optional(lambda v: isinstance(v, str) and len(v) <= MAX_ERROR_TEXT), "null or a message"),
}


def checked_status(address: str, op: str, status: dict[str, Any]) -> dict[str, Any]:
    """``status`` if every field the operator reads has its shape; else
    SchedulerProtocolError naming the field."""
    for field, shape in STATUS_SHAPE.items():
        if field in status and not shape.check(status[field]):
            raise SchedulerProtocolError(
                f"scheduler {address} answered {op!r} with a status whose {field!r} is not "
                f"{shape.what} (or too large); refused"
            )
    return status


async def get_status(address: str, *, timeout: float | None = None) -> dict[str, Any]:
    """What the plugin reports as in force (see amm_core.plugin for the shape)."""
    return await _plugin_call(address, "amm_core_status", timeout=timeout)


async def apply(
    address: str,
    config: Mapping[str, Any],
    owner: Mapping[str, Any],
    *,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Put an AMM config in force on behalf of ``owner`` ({uid, namespace, name,
    generation}); returns the status. Raises ApplyRejected for an invalid config."""
    try:
        return await _plugin_call(
            address,
            "amm_core_apply",
            timeout=timeout,
            config=dict(config),
            owner=dict(owner),
        )
    except SchedulerCallFailed as e:
        if e.remote_type == "ValueError":
            raise ApplyRejected(e.remote_message) from None
        raise


async def restore(address: str, *, timeout: float | None = None) -> dict[str, Any]:
    """Put the scheduler's own AMM configuration back; returns the status."""
    return await _plugin_call(address, "amm_core_restore", timeout=timeout)


# --- installation -------------------------------------------------------------

#: Name of the module shipped beside amm_core in the upload zip (one per amm_core
#: digest, so that a scheduler holding several uploads reloads this one's)
RELOAD_MODULE = f"_amm_core_reload_{amm_core.source_digest()}"

RELOAD_SOURCE = '''\
"""Shipped by dask-memory-operator beside amm_core in its upload zip. distributed's
import_file reloads only amm_core/__init__, and puts a zip first on sys.path only the
first time: this puts this zip first and makes the scheduler forget every amm_core
module, so that amm_core and all its submodules are imported anew from here."""
import os
import sys

_zip = os.path.dirname(__file__)
if _zip in sys.path:
    sys.path.remove(_zip)
sys.path.insert(0, _zip)
for _name in [n for n in sys.modules if n == "amm_core" or n.startswith("amm_core.")]:
    del sys.modules[_name]
'''


def _zip_entry(z: zipfile.ZipFile, arcname: str, data: bytes) -> None:
    info = zipfile.ZipInfo(arcname, date_time=(2020, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    z.writestr(info, data)


@functools.cache
def package_zip() -> tuple[str, bytes]:
    """The amm_core package this process runs, and :data:`RELOAD_MODULE`, as (file
    name, zip bytes). The name carries a hash of the content: a changed package never
    overwrites a zip that a scheduler already has on its sys.path."""
    root = Path(amm_core.__file__).parent
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            _zip_entry(z, path.relative_to(root.parent).as_posix(), path.read_bytes())
        _zip_entry(z, f"{RELOAD_MODULE}.py", RELOAD_SOURCE.encode())
    data = buf.getvalue()
    return f"amm_core-{hashlib.sha256(data).hexdigest()[:12]}.zip", data


def _upload_plugin() -> tuple[str, SchedulerUploadFile]:
    name, data = package_zip()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, name)
        path.write_bytes(data)
        # SchedulerUploadFile reads the file now and carries its bytes
        return name, SchedulerUploadFile(str(path), load=True)


async def _register(
    address: str, plugin: Any, name: str, timeout: float | None, *, idempotent: bool
) -> None:
    await _call(
        address,
        "register_scheduler_plugin",
        timeout=timeout,
        plugin=dumps(plugin),
        name=name,
        idempotent=idempotent,
    )


async def _upload(address: str, timeout: float | None, *, again: bool) -> None:
    """Upload the operator's amm_core; ``again``: even if this zip was uploaded
    before (to re-import it: another upload may have come in between)."""
    zip_name, upload = _upload_plugin()
    await _register(
        address, upload, f"amm-core-upload-{zip_name}", timeout, idempotent=not again
    )


async def _install(address: str, timeout: float | None) -> dict[str, Any]:
    """Register the plugin on a scheduler that has none; returns its status."""
    plugin = MemoryPolicyPlugin(source="live")
    try:
        await _register(address, plugin, PLUGIN_NAME, timeout, idempotent=True)
    except SchedulerCallFailed as e:
        # Unpickling the plugin on the scheduler imports amm_core.plugin
        if not (
            e.remote_type in ("ModuleNotFoundError", "ImportError")
            and "amm_core" in e.remote_message
        ):
            raise
        await _upload(address, timeout, again=False)
        await _register(address, plugin, PLUGIN_NAME, timeout, idempotent=True)
    return await get_status(address, timeout=timeout)


async def _replace(address: str, timeout: float | None) -> dict[str, Any]:
    """Replace a live plugin that runs other amm_core code than the operator's by
    the operator's; returns the new status."""
    await _upload(address, timeout, again=True)
    plugin = MemoryPolicyPlugin(source="live")
    await _register(address, plugin, PLUGIN_NAME, timeout, idempotent=False)
    status = await get_status(address, timeout=timeout)
    left = skew(status)
    if left:
        raise SchedulerCallFailed(
            f"amm_core re-installed on scheduler {address} did not take: {left}", "", ""
        )
    return status


def skew(status: Mapping[str, Any]) -> str | None:
    """None when the scheduler's plugin runs the operator's amm_core code (same
    digest); else a sentence saying what each side runs."""
    theirs = status.get("amm_core_digest")
    ours = amm_core.source_digest()
    if theirs == ours:
        return None
    where = "image ships" if status.get("source") == "preload" else "plugin runs"
    digest = f"digest {theirs}" if theirs else "no digest"
    return (
        f"the scheduler's {where} amm_core {status.get('amm_core_version')} ({digest}) "
        f"but the operator runs amm_core {amm_core.__version__} (digest {ours})"
    )


async def ensure_plugin(address: str, *, timeout: float | None = None) -> str:
    """Make sure the scheduler runs the amm_core plugin. Returns its source:
    "preload" when it came with the scheduler's image, "live" when it was (or had
    been) registered over RPC. A live plugin running other amm_core code than the
    operator's is replaced; a preloaded one never is (see :func:`skew`)."""
    try:
        status = await get_status(address, timeout=timeout)
    except PluginMissing:
        status = await _install(address, timeout)
    if status.get("source") == "live" and skew(status):
        status = await _replace(address, timeout)
    source = status.get("source")
    if source not in ("preload", "live"):
        raise SchedulerCallFailed(
            f"scheduler {address} reports an amm_core plugin of source {source!r}",
            "",
            "",
        )
    return source
