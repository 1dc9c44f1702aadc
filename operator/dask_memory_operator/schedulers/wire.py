"""The trust boundary between the operator and a Dask scheduler: distributed's TCP
framing, spoken by the operator itself, and a strict reader that builds nothing but
plain data from what the scheduler sends. Everything the operator reads from a
scheduler goes through :func:`read_message`; auditing that boundary means reading
this module (the calls that use it are in :mod:`.rpc`).

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

Long lists are cut, not refused. A caller may bound the items of every array
(``max_items``): the items past it are stepped over without building anything (their
framing is still checked within the message's bytes, ext types are still refused,
and at most :data:`MAX_SKIPPED_VALUES` values are stepped over), and the cut is
reported (:attr:`PlainReader.truncated`). Their strings are not decoded and their map
keys not looked at: nothing is built from them, and a placeholder there could point
only to frames that are refused (a plain message has one) or never decoded (an error
reply's). A scheduler that keeps more records than the operator reads (an older
plugin, or one never told to forget) is then read in part, rather than refused as a
whole pass after pass.

One exception: a distributed error reply (``status`` "uncaught-error" or "error")
carries the remote exception and traceback pickled, as ``{"__Serialized__": n}`` in
its ``exception`` and ``traceback`` fields. There, and only there, such a placeholder
is read as ``None`` and the frames it points to are read (within the bounds) but never
decoded; the error is known by its ``exception_text`` (the remote ``repr``), from which
the type name and message are parsed with :func:`ast.literal_eval`
(:func:`.rpc.parse_exception_text`). The same placeholder anywhere else, or in a
message that is not an error reply, is refused.

Compression. Our handshake announces ``compression: None``, so the scheduler settles
on no compression (``Comm.handshake_configuration`` keeps a setting only when both
sides announce the same). distributed never compresses the msgpack frame of a message
anyway, only the sub-frames of pickled or serialized objects, which are refused or,
in an error reply, left undecoded: no decompressor ever runs on scheduler bytes.

What we send is plain msgpack too (:func:`frame`). Only
:func:`.install.ensure_plugin` ships pickles, and only to the scheduler: its
``register_scheduler_plugin`` handler takes pickled plugins and nothing else.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
import sys
from typing import Any

import msgpack
from distributed.protocol.pickle import HIGHEST_PROTOCOL

from dask_memory_operator.untrusted import describe, quoted

#: Bytes of frames one message may announce in its length prelude, all frames
#: together (a status is a few kB; a large cluster's some 100 kB)
MAX_MESSAGE_BYTES = 4 * 2**20
#: Frames one message may announce (a plain message has one; an error reply a few)
MAX_FRAMES = 16
#: Containers (arrays, maps) nested in one another, the outermost included
MAX_DEPTH = 32
#: Values (scalars, containers, map keys) built from one message: room for a status
#: whose lists are at their bound (1000 retirement records of some 25 fields each)
MAX_VALUES = 100_000
#: Values stepped over without being built (array items past ``max_items``) in one
#: message: bounds the time spent on what is not read (some 0.1 s)
MAX_SKIPPED_VALUES = 500_000

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


# --- the strict reader --------------------------------------------------------


#: Keys of a refused value's path shown, and characters of the whole description
MAX_PATH_SHOWN = 8
MAX_DESCRIPTION = 1024


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
        """One bounded line: the path's keys come from the scheduler (a map key of
        megabytes must not become a message of megabytes)."""
        if not self.path:
            return describe(self.reason)
        where = "".join(f"[{quoted(p)}]" for p in self.path[:MAX_PATH_SHOWN])
        if len(self.path) > MAX_PATH_SHOWN:
            where += f"… ({len(self.path)} levels)"
        return describe(self.reason + " at " + where, MAX_DESCRIPTION)


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
    and is listed in ``opaque`` (the caller decides whether that is allowed).

    With ``max_items``, every array keeps its first ``max_items`` items; the others
    are stepped over (:meth:`_skip`) and the cut is listed in ``truncated``."""

    def __init__(
        self,
        data: bytes,
        opaque_fields: frozenset[str] = frozenset(),
        max_items: int | None = None,
    ):
        self.data = data
        self.pos = 0
        self.values = 0
        self.skipped = 0
        self.opaque_fields = opaque_fields
        self.max_items = max_items
        #: Placeholders read as None: Refused errors, should the caller refuse them
        self.opaque: list[Refused] = []
        #: Arrays cut to max_items: (the top-level key they are under, "" for none;
        #: how many items they had)
        self.truncated: list[tuple[str, int]] = []
        #: The top-level key whose value is being read
        self._field = ""

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
        kept = n if self.max_items is None else min(n, self.max_items)
        out = []
        for i in range(kept):
            try:
                out.append(self._value(inner))
            except Refused as e:
                e.path.insert(0, i)
                raise
        if kept < n:
            try:
                self._skip(n - kept)
            except Refused as e:
                e.path.insert(0, f"{kept}:")  # somewhere past the bound
                raise
            self.truncated.append((self._field, n))
        return out

    def _skip(self, count: int) -> None:
        """Step over the next ``count`` values, building nothing: only their framing
        is read (lengths within the message), ext types and the reserved byte are
        refused, strings are not decoded. A loop rather than recursion, tight, so
        that a message full of items past the bound costs little: nesting needs no
        stack, and MAX_SKIPPED_VALUES bounds the steps."""
        data, pos, end = self.data, self.pos, len(self.data)
        skipped = self.skipped
        while count:
            count -= 1
            skipped += 1
            if skipped > MAX_SKIPPED_VALUES:
                raise Refused(f"more than {MAX_SKIPPED_VALUES} values past the lists' bound")
            if pos >= end:
                raise Refused("a truncated message")
            b = data[pos]
            pos += 1
            if b <= 0x7F or b >= 0xE0 or b in _CONSTANTS:
                continue
            if b <= 0x8F:
                count += 2 * (b & 0x0F)
            elif b <= 0x9F:
                count += b & 0x0F
            elif b <= 0xBF:
                pos += b & 0x1F
            elif b in _NUMBERS:
                pos += _NUMBERS[b].size
            elif b in _SIZED:
                kind, length = _SIZED[b]
                if pos + length.size > end:
                    raise Refused("a truncated message")
                (n,) = length.unpack_from(data, pos)
                pos += length.size
                if kind in ("bin", "str"):
                    pos += n
                else:
                    count += n if kind == "array" else 2 * n
            elif b in _EXT:
                raise Refused("a msgpack extension type (ext)")
            else:
                raise Refused(f"the reserved msgpack byte 0x{b:02x}")
        if pos > end:
            raise Refused("a truncated message")
        self.pos = pos
        self.skipped = skipped

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
                raise Refused(f"the map key {quoted(key)} twice")
            if key in PLACEHOLDER_KEYS:
                # Refused at its key: what it points to is never looked at
                return self._opaque(key, n, inner, opaque_field)
            if depth == 0:
                self._field = key
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
    value, _ = read_plain_bounded(data, opaque_fields)
    return value


def read_plain_bounded(
    data: bytes, opaque_fields: frozenset[str] = frozenset(), max_items: int | None = None
) -> tuple[Any, list[tuple[str, int]]]:
    """:func:`read_plain` with every array cut to ``max_items``; the value and the
    cuts (:attr:`PlainReader.truncated`)."""
    reader = PlainReader(data, opaque_fields, max_items)
    value = reader.read()
    if reader.opaque and not is_error_reply(value):
        raise reader.opaque[0]
    return value, reader.truncated


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
    value, _ = await read_bounded_message(reader, opaque_fields)
    return value


async def read_bounded_message(
    reader: asyncio.StreamReader,
    opaque_fields: frozenset[str] = frozenset(),
    max_items: int | None = None,
) -> tuple[Any, list[tuple[str, int]]]:
    """:func:`read_message` with every array cut to ``max_items``; the message and
    the cuts (:attr:`PlainReader.truncated`)."""
    frames = await read_frames(reader)
    value, truncated = read_plain_bounded(frames[0], opaque_fields, max_items)
    if len(frames) > 1 and not is_error_reply(value):
        raise Refused(f"a message of {len(frames)} frames (a plain message has one)")
    return value, truncated
