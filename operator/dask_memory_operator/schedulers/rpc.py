"""The operator's side of the amm_core scheduler plugin: plain-message RPC to a Dask
scheduler, with timeouts and typed errors.

Every call opens a comm to the scheduler (or borrows one from a
:class:`distributed.core.ConnectionPool` when given), sends one message and waits at
most ``timeout`` seconds for the whole exchange. What can go wrong is told apart so
that the operator can act on it:

- :class:`SchedulerUnreachable`: no connection, a dropped connection, or no answer in
  time. The scheduler may be starting, gone, or overloaded; try again later.
- :class:`PluginMissing`: the scheduler answers but has no amm_core plugin (an unknown
  handler makes distributed answer ``None``); :func:`ensure_plugin` installs it.
- :class:`ApplyRejected`: the plugin refused the config; ``message`` is its
  ``ValueError`` text, meant to be shown to the user as is.
- :class:`SchedulerCallFailed`: anything else raised on the scheduler.

Status, apply and restore send only msgpack-able dicts. Only :func:`ensure_plugin`
ships pickles, and only to install the plugin: the scheduler's
``register_scheduler_plugin`` handler takes pickled plugins and nothing else.

Nothing the scheduler sends back is ever unpickled: comms are opened with
``deserialize=False``, a reply must be plain msgpack data, and a remote exception is
known only by distributed's ``exception_text`` (its ``repr``), from which the type
name and message are read. Whoever controls a Dask scheduler (any user of the
cluster) could otherwise run code inside the operator, with its Kubernetes
credentials, through a crafted pickle in a reply.

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
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import io
import os
import re
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distributed.comm import connect, parse_address, parse_host_port
from distributed.core import ConnectionPool, send_recv
from distributed.diagnostics.plugin import SchedulerUploadFile
from distributed.protocol.pickle import dumps

import amm_core
from amm_core.plugin import PLUGIN_NAME, MemoryPolicyPlugin

#: Seconds a call may take, connect included, unless a call says otherwise.
#: Set DASK_MEMORY_OPERATOR_RPC_TIMEOUT to change the default.
DEFAULT_TIMEOUT = float(os.environ.get("DASK_MEMORY_OPERATOR_RPC_TIMEOUT", "5"))


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


async def _refused(address: str) -> bool:
    """Is nothing listening at ``address``? One plain TCP connect; distributed's own
    connect() retries a refusal until its timeout and loses the reason."""
    host, port = parse_host_port(parse_address(address)[1])
    try:
        async with asyncio.timeout(0.5):
            _, writer = await asyncio.open_connection(host, port)
    except ConnectionRefusedError:
        return True
    except (OSError, TimeoutError):
        return False
    writer.close()
    return False


class PluginMissing(SchedulerRPCError):
    """The scheduler has no amm_core plugin."""


class ApplyRejected(SchedulerRPCError):
    """The plugin refused the config. ``message`` is the scheduler's ValueError text."""

    message: str

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class SchedulerCallFailed(SchedulerRPCError):
    """The scheduler raised something else, or answered with something other than
    plain data. ``remote_type`` is the remote exception's class name ("" when the
    reply was the problem) and ``remote_message`` its message."""

    remote_type: str
    remote_message: str

    def __init__(self, message: str, remote_type: str, remote_message: str):
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_message = remote_message


def parse_exception_text(text: str) -> tuple[str, str]:
    """(class name, message) from distributed's ``exception_text``, which is
    ``repr(exception)``, e.g. ``ValueError('bad')`` -> ("ValueError", "bad")."""
    match = re.fullmatch(r"([\w.]+)\((.*)\)", text, re.DOTALL)
    if match is None:
        return "", text
    name, args_text = match.groups()
    try:
        args = ast.literal_eval(f"({args_text},)") if args_text else ()
    except (ValueError, SyntaxError):
        return name, args_text
    if len(args) == 1:
        return name, str(args[0])
    return name, ", ".join(map(str, args))


def plain_reply(value: Any, where: str = "reply") -> Any:
    """Check that a reply is plain msgpack data and turn its tuples into lists
    (distributed's msgpack decodes lists as tuples)."""
    if value is None or isinstance(value, (str, bytes, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain_reply(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: plain_reply(v, f"{where}.{k}") for k, v in value.items()}
    raise SchedulerCallFailed(
        f"the scheduler answered with {type(value).__name__} at {where}, "
        "not plain data; refused",
        "",
        "",
    )


async def _call(
    address: str,
    op: str,
    *,
    timeout: float | None,
    pool: ConnectionPool | None,
    **msg: Any,
) -> Any:
    """Send one message to the scheduler and return its answer."""
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    if pool is not None and pool.deserialize:
        raise ValueError(
            "the ConnectionPool must be made with deserialize=False: scheduler "
            "replies are never unpickled"
        )
    try:
        async with asyncio.timeout(timeout):
            return plain_reply(await _exchange(address, op, timeout, pool, msg))
    except TimeoutError:
        error = SchedulerUnreachable(
            f"scheduler {address} unreachable or did not answer {op!r} within {timeout}s"
        )
    except SchedulerUnreachable as e:
        error = e
    if await _refused(address):
        raise SchedulerUnreachable(
            f"nothing listens at {address} (scheduler starting or down)", refused=True
        ) from None
    raise error


async def _exchange(
    address: str,
    op: str,
    timeout: float,
    pool: ConnectionPool | None,
    msg: dict[str, Any],
) -> Any:
    try:
        if pool is None:
            comm = await connect(address, timeout=timeout, deserialize=False)
        else:
            comm = await pool.connect(address, timeout=timeout)
    except OSError as e:  # refused, unresolvable, or connect's own timeout
        raise SchedulerUnreachable(f"scheduler {address} unreachable: {e}") from None
    try:
        return await send_recv(comm, op=op, **msg)
    except OSError as e:  # CommClosedError included
        raise SchedulerUnreachable(
            f"connection to scheduler {address} lost during {op!r}: {e}"
        ) from None
    except Exception as e:
        # On a comm that does not deserialize, send_recv raises a remote exception as
        # a plain Exception carrying its exception_text
        if type(e) is not Exception:
            raise
        name, message = parse_exception_text(str(e))
        raise SchedulerCallFailed(
            f"{op!r} failed on scheduler {address}: {name}: {message}", name, message
        ) from None
    finally:
        if pool is None:
            await comm.close()
        else:
            pool.reuse(address, comm)


async def _plugin_call(
    address: str,
    op: str,
    *,
    timeout: float | None,
    pool: ConnectionPool | None,
    **msg: Any,
) -> dict[str, Any]:
    answer = await _call(address, op, timeout=timeout, pool=pool, **msg)
    if answer is None:
        raise PluginMissing(f"scheduler {address} has no amm_core plugin")
    return answer


async def get_status(
    address: str,
    *,
    timeout: float | None = None,
    pool: ConnectionPool | None = None,
) -> dict[str, Any]:
    """What the plugin reports as in force (see amm_core.plugin for the shape)."""
    return await _plugin_call(address, "amm_core_status", timeout=timeout, pool=pool)


async def apply(
    address: str,
    config: Mapping[str, Any],
    owner: Mapping[str, Any],
    *,
    timeout: float | None = None,
    pool: ConnectionPool | None = None,
) -> dict[str, Any]:
    """Put an AMM config in force on behalf of ``owner`` ({uid, namespace, name,
    generation}); returns the status. Raises ApplyRejected for an invalid config."""
    try:
        return await _plugin_call(
            address,
            "amm_core_apply",
            timeout=timeout,
            pool=pool,
            config=dict(config),
            owner=dict(owner),
        )
    except SchedulerCallFailed as e:
        if e.remote_type == "ValueError":
            raise ApplyRejected(e.remote_message) from None
        raise


async def restore(
    address: str,
    *,
    timeout: float | None = None,
    pool: ConnectionPool | None = None,
) -> dict[str, Any]:
    """Put the scheduler's own AMM configuration back; returns the status."""
    return await _plugin_call(address, "amm_core_restore", timeout=timeout, pool=pool)


async def open_pool(limit: int = 64, timeout: float | None = None) -> ConnectionPool:
    """A started ConnectionPool fit for these calls (it does not deserialize);
    close it with ``await pool.close()``."""
    pool = ConnectionPool(
        limit=limit,
        deserialize=False,
        timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
    )
    await pool.start()
    return pool


def package_zip() -> tuple[str, bytes]:
    """The amm_core package this process runs, as (file name, zip bytes). The name
    carries a hash of the content: a changed package never overwrites a zip that a
    scheduler already has on its sys.path."""
    root = Path(amm_core.__file__).parent
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            arcname = path.relative_to(root.parent).as_posix()
            info = zipfile.ZipInfo(arcname, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, path.read_bytes())
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
    address: str,
    plugin: Any,
    name: str,
    timeout: float | None,
    pool: ConnectionPool | None,
) -> None:
    await _call(
        address,
        "register_scheduler_plugin",
        timeout=timeout,
        pool=pool,
        plugin=dumps(plugin),
        name=name,
        idempotent=True,
    )


async def ensure_plugin(
    address: str,
    *,
    timeout: float | None = None,
    pool: ConnectionPool | None = None,
) -> str:
    """Make sure the scheduler runs the amm_core plugin. Returns its source:
    "preload" when it came with the scheduler's image, "live" when it was (or had
    been) registered over RPC."""
    try:
        return (await get_status(address, timeout=timeout, pool=pool))["source"]
    except PluginMissing:
        pass

    plugin = MemoryPolicyPlugin(source="live")
    try:
        await _register(address, plugin, PLUGIN_NAME, timeout, pool)
    except SchedulerCallFailed as e:
        # Unpickling the plugin on the scheduler imports amm_core.plugin
        if not (
            e.remote_type in ("ModuleNotFoundError", "ImportError")
            and "amm_core" in e.remote_message
        ):
            raise
        zip_name, upload = _upload_plugin()
        await _register(address, upload, f"amm-core-upload-{zip_name}", timeout, pool)
        await _register(address, plugin, PLUGIN_NAME, timeout, pool)

    return (await get_status(address, timeout=timeout, pool=pool))["source"]
