"""The operator's side of the amm_core scheduler plugin: plain-message RPC to a Dask
scheduler, with timeouts and typed errors. One call (:func:`_call`), the plugin's
handlers (:func:`get_status`, :func:`apply`, :func:`restore`) and the check of the
status's shape; what crosses the wire is framed and read strictly by :mod:`.wire`,
the plugin is installed by :mod:`.install`.

Every call opens one TCP connection to the scheduler, does distributed's handshake,
sends one message and reads one reply; ``timeout`` seconds bound the whole exchange,
connect included. What can go wrong is told apart so that the operator can act on it:

- :class:`SchedulerUnreachable`: no connection, a dropped connection, or no answer in
  time (``refused`` when nothing listens: a scheduler starting or gone). Try later.
- :class:`SchedulerProtocolError`: the scheduler sent something the strict reader
  refuses (see :mod:`.wire`). The message says what, where, and in which exchange.
- :class:`PluginMissing`: the scheduler answers but has no amm_core plugin (an unknown
  handler makes distributed answer ``None``); :func:`.install.ensure_plugin` installs
  it.
- :class:`ApplyRejected`: the plugin refused the config; ``message`` is its
  ``ValueError`` text, meant to be shown to the user as is.
- :class:`SchedulerCallFailed`: anything else raised on the scheduler.

A big answer is read in part, never refused for its size alone: every list in a
reply is cut to :data:`MAX_STATUS_ITEMS` as it is read (:mod:`.wire` steps over the
rest without building it), the cut is logged, and the answer the caller gets says so
under :data:`TRUNCATED` (``{field: items it had}``; set by the operator, never taken
from the scheduler). A scheduler keeping more retirement records than that (an older
plugin that never forgets them) so still gets its passes; only the records past the
bound go unseen.

TLS (``tls://`` addresses) is out of scope: refused with an error.
"""

from __future__ import annotations

import ast
import asyncio
import logging
import re
from collections.abc import Mapping
from typing import Any

from distributed.comm import parse_address, parse_host_port

from dask_memory_operator.untrusted import describe

from dask_memory_operator.schedulers.wire import (
    HANDSHAKE,
    OPAQUE_ERROR_FIELDS,
    Refused,
    frame,
    is_error_reply,
    read_bounded_message,
    read_message,
)

logger = logging.getLogger(__name__)

#: Seconds a call may take, connect included, unless a call says otherwise (the
#: operator passes its --rpc-timeout)
DEFAULT_TIMEOUT = 5.0
#: Characters of a remote exception_text that are parsed (distributed truncates
#: exceptions to distributed.admin.max-error-length, 10,000 by default)
MAX_ERROR_TEXT = 20_000
#: Characters of a remote exception's message kept (escaped: it reaches logs, the
#: status and Events)
MAX_ERROR_MESSAGE = 1024


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
        return "", describe(text, MAX_ERROR_MESSAGE)
    name, args_text = match.groups()
    if len(args_text) > MAX_ERROR_TEXT:
        return name, describe(args_text, MAX_ERROR_MESSAGE)
    try:
        args = ast.literal_eval(f"({args_text},)") if args_text else ()
        message = ", ".join(a if isinstance(a, str) else repr(a) for a in args)
    # What a crafted text can make the parser (or int's repr) raise; it is then
    # shown as it is
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return name, describe(args_text, MAX_ERROR_MESSAGE)
    return name, describe(message, MAX_ERROR_MESSAGE)


def tcp_host_port(address: str) -> tuple[str, int]:
    scheme, location = parse_address(address)
    if scheme != "tcp":
        raise SchedulerRPCError(
            f"scheduler address {address}: only tcp:// is supported (no TLS)"
        )
    host, port = parse_host_port(location)
    return host, port


async def _call(address: str, op: str, *, timeout: float | None, **msg: Any) -> Any:
    """Send one message to the scheduler and return its (plain) answer, every list in
    it cut to MAX_STATUS_ITEMS."""
    reply, _ = await _call_with_cuts(address, op, timeout=timeout, **msg)
    return reply


async def _call_with_cuts(
    address: str, op: str, *, timeout: float | None, max_items: int = 0, **msg: Any
) -> tuple[Any, list[tuple[str, int]]]:
    """:func:`_call`, and the lists it cut to ``max_items`` (MAX_STATUS_ITEMS unless
    given): (top-level field, items it had). The scheduler closes the connection
    after replying (``close``)."""
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    host, port = tcp_host_port(address)
    request = frame({"op": op, "reply": True, "close": True, **msg})
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _open(address, host, port)
            try:
                reply, cuts = await _exchange(reader, writer, address, op, request,
                                              max_items or MAX_STATUS_ITEMS)
            finally:
                # Nothing more is read from or sent to this scheduler
                writer.transport.abort()
    except TimeoutError:
        raise SchedulerUnreachable(
            f"scheduler {address} unreachable or did not answer {op!r} within {timeout}s"
        ) from None
    if is_error_reply(reply):
        raise remote_error(reply, address, op)
    return reply, cuts


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
    max_items: int,
) -> tuple[Any, list[tuple[str, int]]]:
    """Handshakes (ours out, theirs read strictly before anything else is sent), then
    the framed ``request`` out and its reply in (with the lists cut in it)."""
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
            return await read_bounded_message(reader, OPAQUE_ERROR_FIELDS, max_items)
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
    address: str, op: str, *, timeout: float | None, max_items: int = 0, **msg: Any
) -> dict[str, Any]:
    answer, cuts = await _call_with_cuts(address, op, timeout=timeout, max_items=max_items, **msg)
    if answer is None:
        raise PluginMissing(f"scheduler {address} has no amm_core plugin")
    if not isinstance(answer, dict):
        raise SchedulerCallFailed(
            f"scheduler {address} answered {op!r} with a {type(answer).__name__}, "
            "not a map",
            "",
            "",
        )
    answer.pop(TRUNCATED, None)  # the operator's to say, not the scheduler's
    if cuts:
        answer[TRUNCATED] = {field or "(top)": n for field, n in cuts}
        logger.warning("Scheduler %s answered %r with %s", address, op,
                       truncation_note(answer, max_items or MAX_STATUS_ITEMS))
    return checked_status(address, op, answer)


#: Key of an answer under which the operator notes the lists it cut
TRUNCATED = "truncated"


def truncation_note(answer: Mapping[str, Any], limit: int = 0) -> str:
    """What was cut from ``answer`` (to ``limit`` items, MAX_STATUS_ITEMS unless
    given), in a sentence; "" if nothing."""
    cuts = answer.get(TRUNCATED) or {}
    if not cuts:
        return ""
    limit = limit or MAX_STATUS_ITEMS
    fields = ", ".join(f"{field!r} ({n} items)" for field, n in sorted(cuts.items()))
    return f"lists longer than {limit} items, cut to their first {limit}: {fields}"


# --- the status's shape ---------------------------------------------------------

#: Characters of a name or word in a status (class paths, measures, uids, versions)
MAX_STATUS_TEXT = 256
#: Entries of a list in a status (policies, workers to replace, retirements): the
#: reader keeps this many of each list and steps over the rest
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
    # The reader has cut every list to MAX_STATUS_ITEMS: the length is checked again
    # only as the invariant the operator's status patch relies on
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
_RETIREMENT_STATES = ("draining", "moving", "done", "aborted")
_RETIREMENT = _map_with({
    "worker": _text,
    "address": _text,
    "state": lambda v: v in _RETIREMENT_STATES,
    "reason": lambda v: isinstance(v, str) and len(v) <= MAX_ERROR_TEXT,
    "keys_left": _number, "bytes_left": _number, "tasks_running": _number,
    "keys_lost": _number, "bytes_lost": _number,
    "keys_moved": _number, "bytes_moved": _number, "wasted_tasks": _number,
    "seconds": _number, "limit": _number,
    "drain": lambda v: isinstance(v, bool), "left": lambda v: isinstance(v, bool),
})
_RETIREMENTS = _list_of(lambda v: _RETIREMENT(v) and "worker" in v and "state" in v)
_WORKER_STATE = _map_with({
    "name": _text, "address": _text, "status": _text,
    "memory_limit": _number, "nbytes": _number, "processing": _number,
})
_CANDIDATE = _map_with({"worker": _text, "address": _text, "unique_bytes": _number,
                        "unique_keys": _number, "tasks_running": _number})
_WHY_NOT = _map_with({"worker": _text, "reason": lambda v: isinstance(v, str) and len(v) <= MAX_ERROR_TEXT})


def _count(value: Any) -> bool:
    return _number(value) and value >= 0


def _exactly(fields: dict[str, Any]) -> Any:
    """A map with every one of these fields, each passing its check (others ignored)."""
    return lambda value: isinstance(value, dict) and all(k in value and check(value[k])
                                                         for k, check in fields.items())


_COUNTS = _exactly({"workers": _count, "keys": _count, "bytes": _count})
#: amm_core.savings: who asked for a retirement, why a worker's keys were lost
SAVINGS_WHO = ("operator", "hook")
SAVINGS_WHY = ("killed", "retirementAborted", "retired")
#: The counters of amm_core.savings (in every status, and in amm_core_savings)
_SAVINGS_COUNTERS = _exactly({
    "id": _text,
    "started": _number,
    "seq": _count,
    "rescued": _exactly(dict.fromkeys(SAVINGS_WHO, _COUNTS)),
    "lost": _exactly(dict.fromkeys(SAVINGS_WHY, _COUNTS)),
    "duplicates_dropped": _exactly({"replicas": _count, "bytes": _count}),
})
_DEPARTURE_FIELDS = _exactly({
    "seq": _count, "worker": _text, "address": _text, "at": _number,
    "keys": _count, "bytes": _count,
    "why": lambda v: v in SAVINGS_WHY,
    "retirement": lambda v: v is None or v in SAVINGS_WHO,
})
_MOVED = _map_with({"moved_keys": _count, "moved_bytes": _count})  # (not from older plugins)


def _DEPARTURE(value: Any) -> bool:
    return _DEPARTURE_FIELDS(value) and _MOVED(value)


#: Departures read of an amm_core_savings answer at most (amm_core.savings keeps 64)
MAX_DEPARTURES = 64
#: The fields of the plugin's answers the operator reads, and what each must be
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
    "retirements": _Shape(_RETIREMENTS, "a list of retirements"),
    # amm_core_retire, amm_core_retirement_candidates, amm_core_scaling
    "unknown": _Shape(_list_of(_text), "a list of names"),
    "candidates": _Shape(_list_of(lambda v: _CANDIDATE(v) and "worker" in v), "a list of candidates"),
    "excluded": _Shape(_list_of(_WHY_NOT), "a list of workers and reasons"),
    "target": _Shape(lambda v: _number(v) and v >= 0, "a number of workers"),
    "data_bytes": _Shape(lambda v: _number(v) and v >= 0, "a number of bytes"),
    "pause_fraction": _Shape(_optional(lambda v: _number(v) and 0 < v <= 10), "null or a fraction"),
    # the scaling controller reads each worker's name, status and memory_limit
    "worker_states": _Shape(_list_of(
        lambda v: _WORKER_STATE(v) and {"name", "status", "memory_limit"} <= v.keys()),
        "a list of workers"),
    # amm_core.savings' counters, in the status (an older plugin has none)
    "savings": _Shape(_SAVINGS_COUNTERS, "the savings counters"),
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


# --- graceful retirement (amm_core.retirement) ---------------------------------------
# Each call returns at once; the retirement goes on in the scheduler, and the caller
# follows it with retirements(). The records come back checked like a status.


async def retire(
    address: str, workers: list[str], limit: float, *, drain: bool = True, reason: str = "",
    timeout: float | None = None,
) -> dict[str, Any]:
    """Start retiring ``workers`` (names or addresses); {"retirements", "unknown"}."""
    return await _plugin_call(address, "amm_core_retire", timeout=timeout,
                              workers=list(workers), limit=limit, drain=drain, reason=reason)


async def retirements(address: str, *, timeout: float | None = None) -> list[dict[str, Any]]:
    """Every retirement record the scheduler keeps."""
    return (await get_status(address, timeout=timeout)).get("retirements", [])


async def cancel_retirement(address: str, workers: list[str], *, timeout: float | None = None) -> dict[str, Any]:
    """Put workers back in service; {"cancelled", "retirements"}."""
    return await _plugin_call(address, "amm_core_cancel_retirement", timeout=timeout, workers=list(workers))


async def forget_retirement(address: str, workers: list[str], *, timeout: float | None = None) -> dict[str, Any]:
    """Drop the records of workers whose pods are gone; {"forgotten", "kept"}."""
    return await _plugin_call(address, "amm_core_forget_retirement", timeout=timeout, workers=list(workers))


async def retirement_candidates(
    address: str, workers: list[str], n: int, *, timeout: float | None = None
) -> dict[str, Any]:
    """The ``n`` of ``workers`` best retired now, and why the others are not;
    {"candidates", "excluded"}."""
    return await _plugin_call(address, "amm_core_retirement_candidates", timeout=timeout,
                              workers=list(workers), n=n)


async def savings(address: str, *, timeout: float | None = None) -> dict[str, Any]:
    """What the scheduler rescued, lost and dropped, with its latest departures
    (amm_core.savings): ``{"counters": <as in the status>, "now": scheduler time,
    "departures": [...]}``, every departure checked, at most MAX_DEPARTURES of
    them read. Asked only when the status's ``savings.seq`` moved."""
    answer = await _plugin_call(address, "amm_core_savings", timeout=timeout, max_items=MAX_DEPARTURES)
    departures = answer.get("departures")
    if not (_SAVINGS_COUNTERS(answer) and _number(answer.get("now"))
            and isinstance(departures, list) and all(map(_DEPARTURE, departures))):
        raise SchedulerProtocolError(
            f"scheduler {address} answered 'amm_core_savings' with something else than "
            f"the savings counters and departures (or too large); refused")
    return {"counters": {k: answer[k] for k in ("id", "started", "seq", "rescued", "lost", "duplicates_dropped")},
            "now": answer["now"], "departures": departures}


async def scaling(address: str, *, timeout: float | None = None) -> dict[str, Any]:
    """The adaptive target, the data in memory and each worker; see amm_core.plugin."""
    return await _plugin_call(address, "amm_core_scaling", timeout=timeout)


# --- the report's read (amm_core.history; the savings are read above) -----------

#: Rows of a memory history read at most: amm_core.history keeps up to 1,992 (raw
#: samples and two averaged tiers); some 16,000 values, far inside the wire's bounds
MAX_HISTORY_ROWS = 2500


async def memory_history(address: str, *, timeout: float | None = None) -> dict[str, Any]:
    """The cluster's memory over time and the scheduler's markers (see
    amm_core.history for the shape); lists past MAX_HISTORY_ROWS are cut."""
    return await _plugin_call(address, "amm_core_memory_history", timeout=timeout,
                              max_items=MAX_HISTORY_ROWS)

