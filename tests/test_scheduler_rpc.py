"""The operator's RPC client (dask_memory_operator.schedulers: rpc, wire, install) on the
wire.

A *fake scheduler* (an asyncio TCP server speaking distributed's framing, its
messages encoded by distributed's own ``dumps``) plays a hostile scheduler: pickles,
ext types, oversized or deep messages, at the handshake and in replies. The pickles
run ``touch <marker>`` when loaded; every test checks that the marker never appears.
Real schedulers (LocalCluster in this process, ``dask scheduler`` subprocesses) show
that the same client still does everything the operator needs, including replacing a
live plugin that runs other amm_core code.
"""

from __future__ import annotations

import asyncio
import enum
import io
import os
import pickle
import re
import shlex
import socket
import struct
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from distributed import Client, Scheduler
from distributed.comm import connect
from distributed.protocol import dumps, loads
from distributed.protocol.serialize import Pickled, Serialize, ToPickle
from distributed.protocol.utils import pack_frames_prelude, unpack_frames
from test_plugin import (  # noqa: F401  (cluster is a fixture)
    HIDE_EDITABLE_INSTALL,
    KeepCopies,
    cluster,
    config,
    owner,
    scheduler_process,
    until,
)

import amm_core
from amm_core.plugin import PLUGIN_NAME, MemoryPolicyPlugin
from dask_memory_operator.schedulers import install, rpc
from dask_memory_operator.schedulers.rpc import (
    ApplyRejected,
    SchedulerCallFailed,
    SchedulerProtocolError,
    SchedulerRPCError,
    SchedulerUnreachable,
)
from dask_memory_operator.schedulers.wire import MAX_MESSAGE_BYTES, MAX_SKIPPED_VALUES, MAX_VALUES

GiB = 2**30

# --- a fake scheduler ---------------------------------------------------------


def wire(frames: list[bytes]) -> bytes:
    """Frames as distributed's TCP comm writes them (all in the "no split" part)."""
    prelude = pack_frames_prelude(frames)
    return struct.pack("Q", len(prelude) + sum(map(len, frames))) + prelude + b"".join(frames)


def message(msg: Any) -> bytes:
    """``msg`` encoded by distributed itself: ToPickle, Serialize, Pickled, sets and
    enums come out as a real scheduler would send them."""
    return wire(dumps(msg))


SCHEDULER_HANDSHAKE = {"compression": None, "python": (3, 11, 0), "pickle-protocol": 5}


async def receive(reader: asyncio.StreamReader) -> Any:
    """One message as distributed's TCP comm reads it (the fake trusts the operator)."""
    (nosplit,) = struct.unpack("Q", await reader.readexactly(8))
    frames, missing = unpack_frames(await reader.readexactly(nosplit), partial=True)
    frames += [await reader.readexactly(n) for n in missing]
    return loads(frames)


class FakeScheduler:
    """Sends ``handshake`` (wire bytes) on every connection (and hangs up, with
    ``hang_up``), reads the client's handshake, then answers every message with
    ``answer(msg)``. Records what it got."""

    def __init__(
        self,
        handshake: bytes = message(SCHEDULER_HANDSHAKE),
        answer: Callable[[dict[str, Any]], bytes] = lambda msg: message(None),
        hang_up: bool = False,
    ):
        self.handshake = handshake
        self.answer = answer
        self.hang_up = hang_up
        self.handshakes: list[Any] = []
        self.received: list[dict[str, Any]] = []
        self.connections: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"tcp://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()
        # Let each connection see the client's hang-up (a task still running when the
        # test's loop closes is cancelled, and asyncio logs that as an error)
        if self.connections:
            await asyncio.wait(self.connections, timeout=5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        try:
            writer.write(self.handshake)
            if self.hang_up:
                return
            self.handshakes.append(await receive(reader))
            while True:
                msg = await receive(reader)
                self.received.append(msg)
                writer.write(self.answer(msg))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client hung up
        finally:
            writer.close()


class Boom:
    """An attacker's object: loading its pickle runs a shell command that creates
    ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class Color(enum.Enum):
    RED = 1


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "pickle-ran"


def header_only(nframes: int, lengths: list[int]) -> bytes:
    """A length prelude announcing frames that never come."""
    prelude = struct.pack(f"Q{len(lengths)}Q", nframes, *lengths)
    return struct.pack("Q", len(prelude) + sum(lengths)) + prelude


# (what the hostile scheduler sends, given the marker; what the refusal says)
ATTACKS: dict[str, tuple[Callable[[Path], bytes], str]] = {
    "to_pickle": (lambda m: message({"x": ToPickle(Boom(m))}), r"pickled object \(__Pickled__\) at \['x'\]"),
    "whole_message_pickled": (lambda m: message(ToPickle(Boom(m))), r"pickled object"),
    "serialize": (lambda m: message({"x": [Serialize(Boom(m))]}), r"serialized object .* at \['x'\]\[0\]"),
    "pickled": (
        lambda m: message({"x": Pickled({"pickled-obj": pickle.dumps(Boom(m))}, [])}),
        r"pickled object",
    ),
    "enum": (lambda m: message({"x": Color.RED}), r"enum placeholder"),
    "set": (lambda m: message({"x": {1, 2}}), r"set placeholder"),
    "ext_type": (lambda m: wire([msgpack.packb({"x": msgpack.ExtType(42, b"\0")})]), r"extension type"),
    "timestamp_ext": (lambda m: wire([msgpack.packb([msgpack.Timestamp(1, 0)])]), r"extension type"),
    "reserved_byte": (lambda m: wire([b"\xc1"]), r"reserved msgpack byte 0xc1"),
    "oversized_frame": (lambda m: header_only(1, [10 * GiB]), r"message of 10737418240 bytes"),
    "frames_too_big_together": (
        lambda m: header_only(2, [MAX_MESSAGE_BYTES, 1]),
        rf"message of {MAX_MESSAGE_BYTES + 1} bytes",
    ),
    "too_many_frames": (lambda m: header_only(10**6, []), r"message of 1000000 frames \(limit 16\)"),
    "no_frame": (lambda m: header_only(0, []), r"message of 0 frames"),
    "extra_frame": (lambda m: wire([msgpack.packb({"a": 1}), b"data"]), r"2 frames \(a plain message has one\)"),
    "bad_frame_header": (lambda m: b"\x05" + wire([msgpack.packb(1)])[1:], r"frame header"),
    "deep_nesting": (lambda m: wire([b"\x91" * 100 + b"\xc0"]), r"nested more than 32 deep"),
    "int_map_key": (lambda m: wire([msgpack.packb({"a": {1: "x"}})]), r"map key of type int at \['a'\]"),
    "bytes_map_key": (lambda m: wire([msgpack.packb({b"k": "x"}, use_bin_type=True)]), r"map key of type bytes"),
    "duplicate_key": (lambda m: wire([b"\x82\xa1k\x01\xa1k\x02"]), r"map key 'k' twice"),
    # a map: lists are cut to their bound in replies, maps are not
    "too_many_values": (
        lambda m: wire([msgpack.packb({f"k{i}": 0 for i in range(MAX_VALUES // 2 + 1)})]),
        rf"more than {MAX_VALUES} values",
    ),
    # past a reply's list bound, items are stepped over, a bounded number of them
    "too_many_values_past_the_bound": (
        lambda m: wire([b"\xdd" + struct.pack(">I", 2 * MAX_SKIPPED_VALUES) + b"\xc0" * (2 * MAX_SKIPPED_VALUES)]),
        r"more than \d+ values",
    ),
    "not_utf8": (lambda m: wire([b"\xa2\xff\xfe"]), r"not UTF-8"),
    "truncated": (lambda m: wire([b"\x92\x01"]), r"truncated"),
    "trailing_bytes": (lambda m: wire([b"\x80\x00"]), r"1 bytes after the message"),
}


async def status_or_refusal(addr: str) -> SchedulerProtocolError:
    started = time.monotonic()
    with pytest.raises(SchedulerProtocolError) as info:
        await rpc.get_status(addr, timeout=10)
    # Refused from what was read: nothing waited for the bytes a prelude announced
    assert time.monotonic() - started < 5
    return info.value


@pytest.mark.parametrize("attack", ATTACKS)
async def test_hostile_handshake_is_refused_and_nothing_is_sent_after_it(attack, marker):
    send, refusal = ATTACKS[attack]
    fake = FakeScheduler(handshake=send(marker))
    async with fake as addr:
        error = await status_or_refusal(addr)
    assert str(error).startswith(f"scheduler {addr} sent ")
    assert str(error).endswith(" in its handshake; refused")
    assert re.search(refusal, str(error)), str(error)
    assert fake.received == []  # the call itself was never sent
    assert not marker.exists()


@pytest.mark.parametrize("attack", ATTACKS)
async def test_hostile_reply_is_refused(attack, marker):
    send, refusal = ATTACKS[attack]
    fake = FakeScheduler(answer=lambda msg: send(marker))
    async with fake as addr:
        error = await status_or_refusal(addr)
    assert str(error).endswith(" in its reply to 'amm_core_status'; refused")
    assert re.search(refusal, str(error)), str(error)
    assert [m["op"] for m in fake.received] == ["amm_core_status"]
    assert not marker.exists()


async def test_distributeds_own_comm_runs_these_pickles_even_without_deserialize(tmp_path):
    """The attacks above are live: distributed's connect() and read() with
    deserialize=False run them (FACTS.md, "Wire safety")."""
    at_handshake, in_reply = tmp_path / "handshake", tmp_path / "reply"
    fake = FakeScheduler(
        handshake=message({**SCHEDULER_HANDSHAKE, "x": ToPickle(Boom(at_handshake))}),
        answer=lambda msg: message({"x": ToPickle(Boom(in_reply))}),
    )
    async with fake as addr:
        comm = await connect(addr, deserialize=False)
        assert at_handshake.exists()
        await comm.write({"op": "amm_core_status", "reply": True})
        await comm.read()
        assert in_reply.exists()
        await comm.close()


# --- error replies --------------------------------------------------------------


def error_reply(**fields: Any) -> bytes:
    return message(
        {
            "status": "uncaught-error",
            "exception_text": "ValueError('bad measure')",
            "traceback_text": '  File "x.py", line 1\n',
            **fields,
        }
    )


async def test_error_reply_is_read_from_its_text_and_its_pickles_are_never_loaded(marker):
    fake = FakeScheduler(
        answer=lambda msg: error_reply(
            exception=ToPickle(Boom(marker)), traceback=Serialize(Boom(marker))
        )
    )
    async with fake as addr:
        with pytest.raises(ApplyRejected) as info:
            await rpc.apply(addr, config(), owner())
        assert info.value.message == "bad measure"
        with pytest.raises(SchedulerCallFailed) as failed:
            await rpc.get_status(addr)
        assert (failed.value.remote_type, failed.value.remote_message) == (
            "ValueError",
            "bad measure",
        )
    assert not marker.exists()


@pytest.mark.parametrize(
    "reply, refusal",
    [
        # a pickle in a field that is not one of the error reply's opaque ones
        (lambda m: error_reply(exception_text=ToPickle(Boom(m))), r"\['exception_text'\]"),
        # the opaque fields are opaque only in an error reply
        (lambda m: message({"source": "live", "exception": ToPickle(Boom(m))}), r"\['exception'\]"),
        (lambda m: error_reply(status="ok", exception=ToPickle(Boom(m))), r"\['exception'\]"),
        # only a lone placeholder, at the top level
        (lambda m: error_reply(exception={"__Pickled__": 1, "x": 2}), r"pickled object"),
        (lambda m: error_reply(exception=[ToPickle(Boom(m))]), r"\['exception'\]\[0\]"),
    ],
    ids=["other_field", "not_an_error_reply", "status_not_an_error", "not_lone", "nested"],
)
async def test_pickles_outside_an_error_replys_opaque_fields_are_refused(reply, refusal, marker):
    async with FakeScheduler(answer=lambda msg: reply(marker)) as addr:
        error = await status_or_refusal(addr)
    assert re.search(refusal, str(error)), str(error)
    assert not marker.exists()


def test_exception_text_is_parsed_as_a_literal_and_bounded():
    parse = rpc.parse_exception_text
    assert parse("ValueError('bad')") == ("ValueError", "bad")
    assert parse("KeyError('a', 2)") == ("KeyError", "a, 2")
    assert parse("ModuleNotFoundError(\"No module named 'amm_core'\")") == (
        "ModuleNotFoundError",
        "No module named 'amm_core'",
    )
    assert parse("not a repr") == ("", "not a repr")
    assert parse("E(__import__('os').system('x'))") == ("E", "__import__('os').system('x')")
    assert parse("E(" + "(" * 1000 + ")" * 1000 + ")")[0] == "E"
    name, message = parse("E('" + "x" * (2 * rpc.MAX_ERROR_TEXT) + "')")
    assert name == "E" and len(message) == rpc.MAX_ERROR_MESSAGE  # cut, and says so
    assert message.endswith(f"({2 * rpc.MAX_ERROR_TEXT + 2} characters)")
    # an int too long for str(): still two bounded strings, nothing raised
    name, message = parse("E(0x" + "f" * 19000 + ")")
    assert name == "E" and len(message) <= rpc.MAX_ERROR_MESSAGE
    # a class name of any length is not a class name
    name, message = parse("a" * 100_000 + "()")
    assert name == "" and len(message) == rpc.MAX_ERROR_MESSAGE


# --- the transport ----------------------------------------------------------------


async def test_handshake_asks_for_no_compression_and_calls_are_plain_msgpack():
    fake = FakeScheduler(answer=lambda msg: message({"source": "live", "echo": msg["config"]}))
    async with fake as addr:
        status = await rpc.apply(addr, {"policies": [{"class": "X", "n": (1, 2)}]}, owner())
    (handshake,) = fake.handshakes
    assert handshake["compression"] is None and handshake["pickle-protocol"] >= 5
    (sent,) = fake.received
    assert sent["op"] == "amm_core_apply" and sent["close"] is True
    assert status["echo"] == {"policies": [{"class": "X", "n": [1, 2]}]}  # lists, not tuples
    with pytest.raises(TypeError):  # nothing is pickled on the way out either
        await rpc.apply(addr, {"x": {1, 2}}, owner())


async def test_a_silent_scheduler_times_out_and_a_hanging_up_one_is_unreachable():
    async with FakeScheduler(handshake=b"") as addr:
        started = time.monotonic()
        with pytest.raises(SchedulerUnreachable, match="within 0.5s") as info:
            await rpc.get_status(addr, timeout=0.5)
        assert time.monotonic() - started < 3 and not info.value.refused
    async with FakeScheduler(handshake=message(SCHEDULER_HANDSHAKE)[:10], hang_up=True) as addr:
        with pytest.raises(SchedulerUnreachable, match="lost during 'amm_core_status'"):
            await rpc.get_status(addr, timeout=5)


async def test_only_tcp_addresses_are_supported():
    with pytest.raises(SchedulerRPCError, match="only tcp://"):
        await rpc.get_status("tls://127.0.0.1:8786")


async def test_unreachable_scheduler_raises_scheduler_unreachable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    addr = f"tcp://127.0.0.1:{port}"  # nothing listens here any more
    for call in (
        rpc.get_status(addr, timeout=0.5),
        rpc.apply(addr, config(), owner(), timeout=0.5),
        rpc.restore(addr, timeout=0.5),
        install.ensure_plugin(addr, timeout=0.5),
    ):
        with pytest.raises(SchedulerUnreachable, match=str(port)) as info:
            await asyncio.wait_for(call, 30)
        assert info.value.refused


# --- real schedulers ----------------------------------------------------------------


async def test_calls_work_on_a_real_scheduler_and_its_objects_are_refused(cluster):
    cl, _ = cluster
    addr = cl.scheduler_address
    assert await install.ensure_plugin(addr) == "live"
    status = await rpc.apply(addr, config(interval="1s"), owner())
    assert status["amm"]["interval"] == 1.0
    with pytest.raises(ApplyRejected, match="measure"):
        await rpc.apply(addr, config(measure="rss"), owner(2))
    assert (await rpc.get_status(addr))["owner"] == owner()
    assert (await rpc.restore(addr))["owner"] is None

    # A real error reply carries the exception pickled: read from its text only
    def fail() -> None:
        raise RuntimeError("status is broken")

    cl.scheduler.handlers["amm_core_status"] = fail
    with pytest.raises(SchedulerCallFailed, match="RuntimeError: status is broken"):
        await rpc.get_status(addr)

    # A scheduler answering with an object (distributed sends it as a pickle)
    cl.scheduler.handlers["amm_core_status"] = lambda: {"policy": KeepCopies()}
    with pytest.raises(SchedulerProtocolError, match=r"pickled object .*\['policy'\]"):
        await rpc.get_status(addr)


def test_package_zip_is_stable_and_holds_amm_core():
    name, data = install.package_zip()
    assert install.package_zip() == (name, data)
    assert name.startswith("amm_core-") and name.endswith(".zip")
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        names = set(z.namelist())
    assert {"amm_core/__init__.py", "amm_core/plugin.py", "amm_core/_room.py"} <= names
    assert f"{install.RELOAD_MODULE}.py" in names
    assert not any("__pycache__" in n for n in names)


# --- version skew -------------------------------------------------------------------

SKEW_PATCH = '''

# A copy of amm_core that is not the operator's (TAG): its status says so
_operator_status = MemoryPolicyPlugin.status


def _skewed_status(self):
    return {**_operator_status(self), "skewed_copy": "TAG"}


MemoryPolicyPlugin.status = _skewed_status
'''


def skewed_amm_core_zip(folder: Path, tag: str, *, reload_module: bool) -> Path:
    """amm_core as another operator version would upload it: plugin.py differs (its
    status carries ``skewed_copy``); with or without a reload module like ours."""
    root = Path(amm_core.__file__).parent
    path = folder / f"amm_core-skewed-{tag}.zip"
    with zipfile.ZipFile(path, "w") as z:
        for source in sorted(root.glob("*.py")):
            text = source.read_text()
            if source.name == "plugin.py":
                text += SKEW_PATCH.replace("TAG", tag)
            z.writestr(f"amm_core/{source.name}", text)
        if reload_module:
            z.writestr(f"_amm_core_reload_{tag}.py", install.RELOAD_SOURCE)
    return path


async def install_as_another_operator(addr: str, zip_path: Path) -> None:
    plugin = MemoryPolicyPlugin(source="live")
    plugin.idempotent = False  # replace whatever plugin is there
    async with Client(addr, asynchronous=True) as client:
        await client.upload_file(str(zip_path))
        await client.register_plugin(plugin, name=PLUGIN_NAME)


async def next_cycle(addr: str, status: dict[str, Any]) -> dict[str, Any]:
    """The scheduler's status once its AMM has run a cycle after ``status``."""

    async def later() -> dict[str, Any] | None:
        now = await rpc.get_status(addr)
        return now if now["amm"]["cycles"] > status["amm"]["cycles"] else None

    return await until(later, "an AMM cycle")


async def test_live_plugin_running_other_amm_core_code_is_replaced(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE_EDITABLE_INSTALL)
    ours = amm_core.source_digest()
    replicate = config(interval="100ms", policies=[{"class": "amm_core.replicate.Replicate"}])
    async with scheduler_process(tmp_path, env={"PYTHONPATH": str(site)}) as addr:
        # An older operator, on a scheduler without amm_core
        older = skewed_amm_core_zip(tmp_path, "older", reload_module=False)
        await install_as_another_operator(addr, older)
        status = await rpc.get_status(addr)
        assert status["skewed_copy"] == "older" and status["amm_core_digest"] != ours
        assert f"plugin runs amm_core {amm_core.__version__}" in install.skew(status)
        await rpc.apply(addr, replicate, owner(1))

        for round, tag in enumerate(["", "newer"]):
            if tag:
                # Another operator takes over again, then this one: its zip, uploaded
                # before and now behind the other one on sys.path, must win again
                newer = skewed_amm_core_zip(tmp_path, tag, reload_module=True)
                await install_as_another_operator(addr, newer)
                assert (await rpc.get_status(addr))["skewed_copy"] == tag

            assert await install.ensure_plugin(addr) == "live"
            status = await rpc.get_status(addr)
            assert "skewed_copy" not in status, f"round {round}: the old code still runs"
            assert status["amm_core_digest"] == ours and install.skew(status) is None
            assert install.package_zip()[0] in status["amm_core_path"]

            # The new plugin holds the handlers and the AMM: apply builds policies from
            # the operator's code, and they run
            status = await rpc.apply(addr, replicate, owner(2 + round))
            assert status["owner"] == owner(2 + round) and status["in_force"]
            status = await next_cycle(addr, status)
            assert [r["class"] for r in status["policy_reports"]] == ["Replicate"]
            assert await install.ensure_plugin(addr) == "live"  # nothing to replace now


def plugin_status(source: str, digest: str | None) -> dict[str, Any]:
    return {"source": source, "amm_core_version": "0.0.9", "amm_core_digest": digest}


async def test_preloaded_plugin_running_other_code_is_left_alone_and_told():
    fake = FakeScheduler(answer=lambda msg: message(plugin_status("preload", "abc")))
    async with fake as addr:
        assert await install.ensure_plugin(addr) == "preload"
        status = await rpc.get_status(addr)
    assert [m["op"] for m in fake.received] == ["amm_core_status"] * 2  # nothing installed
    assert install.skew(status) == (
        "the scheduler's image ships amm_core 0.0.9 (digest abc) but the operator runs "
        f"amm_core {amm_core.__version__} (digest {amm_core.source_digest()})"
    )


def test_skew_is_none_for_the_operators_own_code():
    ours = amm_core.source_digest()
    assert install.skew(plugin_status("live", ours)) is None
    assert install.skew(plugin_status("preload", ours)) is None
    assert "plugin runs amm_core 0.0.9 (no digest)" in install.skew(plugin_status("live", None))


async def test_a_replacement_that_does_not_take_is_an_error():
    # A scheduler that accepts every registration but keeps reporting other code
    def answer(msg: dict[str, Any]) -> bytes:
        if msg["op"] == "amm_core_status":
            return message(plugin_status("live", "abc"))
        return message(None)

    fake = FakeScheduler(answer=answer)
    async with fake as addr:
        with pytest.raises(SchedulerCallFailed, match="did not take: .*digest abc"):
            await install.ensure_plugin(addr)
    ops = [(m["op"], m.get("idempotent")) for m in fake.received]
    assert ops == [
        ("amm_core_status", None),
        ("register_scheduler_plugin", False),  # the upload, again
        ("register_scheduler_plugin", False),  # the plugin, replacing the old one
        ("amm_core_status", None),
    ]


# --- through the reconciler: one hostile cluster degrades only itself -----------------


class Locator:
    """Each cluster's scheduler at an address of the test's choosing."""

    def __init__(self, addresses: dict[str, str]):
        self.addresses = addresses

    async def address(self, namespace: str, cluster: str) -> str:
        return self.addresses[cluster]

    async def forget(self, namespace: str, cluster: str) -> None:
        pass


async def test_a_hostile_scheduler_is_degraded_and_the_others_converge(cluster, marker):
    from dask_memory_operator.api.memorypolicy import parse_spec
    from dask_memory_operator.schedulers.converge import ClusterReconciler

    cl, _ = cluster
    send, _ = ATTACKS["to_pickle"]
    wanted = parse_spec({"clusterSelector": {}, "activeMemoryManager": {"interval": "1s"}})
    async with FakeScheduler(handshake=send(marker)) as at_handshake, \
            FakeScheduler(answer=lambda msg: send(marker)) as in_reply:
        reconciler = ClusterReconciler(Locator({"handshake": at_handshake, "reply": in_reply,
                                                "good": cl.scheduler_address}), rpc_timeout=5)
        outcomes = await asyncio.gather(*(reconciler.converge("ns", c, wanted, owner())
                                          for c in ("handshake", "reply", "good")))
    hostile_handshake, hostile_reply, good = outcomes
    for outcome in (hostile_handshake, hostile_reply):
        assert outcome.state == "Degraded"
        assert outcome.message.startswith("scheduler protocol error: scheduler tcp://")
        assert "sent a pickled object" in outcome.message and outcome.message.endswith("refused")
    assert good.state == "Applied" and good.amm["interval"] == "1s"
    assert not marker.exists()


async def test_converging_a_scheduler_with_an_older_live_plugin_replaces_it(tmp_path):
    """After an operator upgrade, the next pass replaces the live plugin and says so."""
    from dask_memory_operator.api.memorypolicy import parse_spec
    from dask_memory_operator.schedulers.converge import ClusterReconciler

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE_EDITABLE_INSTALL)
    wanted = parse_spec({"clusterSelector": {}, "activeMemoryManager": {"interval": "1s"}})
    async with scheduler_process(tmp_path, env={"PYTHONPATH": str(site)}) as addr:
        await install_as_another_operator(addr, skewed_amm_core_zip(tmp_path, "older", reload_module=False))
        reconciler = ClusterReconciler(Locator({"c": addr}), rpc_timeout=10)
        outcome = await reconciler.converge("ns", "c", wanted, owner())
        assert outcome.state == "Applied" and outcome.plugin_warning is None
        assert outcome.actions[0].startswith("replaced the live amm_core plugin: the scheduler's plugin runs")
        status = await rpc.get_status(addr)
        assert status["amm_core_digest"] == amm_core.source_digest() and status["owner"] == owner()
        again = await reconciler.converge("ns", "c", wanted, owner())
        assert again.actions == []  # nothing left to replace or apply


# --- a plain reply of the wrong shape ------------------------------------------------

GOOD_STATUS = {"source": "live", "owner": None, "in_force": True, "workers": 1, "replace": [],
               "amm": {"running": True, "interval": 2.0, "measure": "optimistic", "policies": []},
               "amm_core_digest": None, "amm_core_version": None}


@pytest.mark.parametrize("field, value", [
    ("source", "evil"),                          # the CRD's enum would refuse the whole status
    ("owner", "x"),
    ("owner", {"uid": ["not", "a", "uid"]}),
    ("amm", {"interval": "x"}),
    ("amm", {"policies": [1]}),
    ("amm", {"measure": "m" * 2**20}),           # past etcd's limit once in the status
    ("replace", [1]),
    ("workers", float("nan")),
    ("in_force", "yes"),
])
async def test_a_status_of_the_wrong_shape_is_a_protocol_error(field, value):
    fake = FakeScheduler(answer=lambda msg: message({**GOOD_STATUS, field: value}))
    async with fake as addr:
        with pytest.raises(SchedulerProtocolError, match=f"status whose '{field}' is not"):
            await rpc.get_status(addr)


async def test_a_status_of_the_right_shape_passes():
    async with FakeScheduler(answer=lambda msg: message(GOOD_STATUS)) as addr:
        assert (await rpc.get_status(addr))["source"] == "live"


async def test_a_late_pass_of_an_older_generation_leaves_the_newer_one_in_force():
    """The plugin never goes back a generation; the reconciler neither reads that as a
    configuration that did not take nor applies again."""
    from dask_memory_operator.api.memorypolicy import parse_spec
    from dask_memory_operator.schedulers.converge import ClusterReconciler

    newer = {**GOOD_STATUS, "owner": owner(3), "amm_core_digest": amm_core.source_digest()}
    fake = FakeScheduler(answer=lambda msg: message(newer))
    wanted = parse_spec({"clusterSelector": {}, "activeMemoryManager": {}})
    async with fake as addr:
        outcome = await ClusterReconciler(Locator({"c": addr})).converge("ns", "c", wanted, owner(2))
    assert outcome.state == "Applied" and outcome.applied_generation == 3 and outcome.actions == []
    assert [m["op"] for m in fake.received] == ["amm_core_status"]  # nothing applied


# --- graceful retirement, from the operator's side -------------------------------------


async def test_a_worker_is_retired_through_the_plugin_and_its_data_moves(cluster):
    cl, client = cluster
    addr = cl.scheduler_address
    assert await install.ensure_plugin(addr) == "live"
    await client.wait_for_workers(2)
    names = {w: ws.name for w, ws in cl.scheduler.workers.items()}
    victim, keeper = sorted(names)
    [data] = await client.scatter([b"x" * 2**20], workers=[victim])
    name = str(names[victim])

    candidates = await rpc.retirement_candidates(addr, [str(n) for n in names.values()], 1)
    assert [c["worker"] for c in candidates["candidates"]] == [str(names[keeper])]  # holds nothing

    started = await rpc.retire(addr, [name, "no-such-worker"], 30, reason="scale-down")
    assert started["unknown"] == ["no-such-worker"]
    assert [r["worker"] for r in started["retirements"]] == [name]

    async def done() -> dict[str, Any] | None:
        [record] = [r for r in await rpc.retirements(addr) if r["worker"] == name]
        return record if record["state"] == "done" else None

    record = await until(done, "the retirement to be done")
    assert record["keys_left"] == 0 and record["bytes_moved"] >= 2**20
    who_has = await client.scheduler.who_has(keys=[data.key])
    assert keeper in who_has[data.key]  # the only copy moved before anything went

    # the worker is still connected: its record is kept until its pod is gone
    assert [k["worker"] for k in (await rpc.forget_retirement(addr, [name]))["kept"]] == [name]
    # done is a commit: the worker is not put back in service
    cancelled = await rpc.cancel_retirement(addr, [name])
    assert cancelled["cancelled"] == [] and [k["worker"] for k in cancelled["kept"]] == [name]
    assert cl.scheduler.workers[victim].status.name == "closing_gracefully"


async def test_a_retirement_record_of_the_wrong_shape_is_a_protocol_error():
    bad = {**GOOD_STATUS, "amm_core_digest": amm_core.source_digest(),
           "retirements": [{"worker": "w", "state": "gone-fishing"}]}
    async with FakeScheduler(answer=lambda msg: message(bad)) as addr:
        with pytest.raises(SchedulerProtocolError, match="'retirements' is not a list of retirements"):
            await rpc.retirements(addr)


# --- a big answer (issue 14, case 3) -----------------------------------------------


def gone_worker_record(i: int) -> dict[str, Any]:
    """A record as the plugin keeps one for a hook's worker whose pod went."""
    return {"worker": f"gone-{i:04d}", "address": f"tcp://10.0.{i // 250}.{i % 250}:8788",
            "state": "done", "reason": "preStop: pod deleted", "requested": "preStop: pod deleted",
            "blocked": "", "keys_left": 0, "bytes_left": 0, "tasks_running": 0, "keys_moved": 3,
            "bytes_moved": 3 * 2**20, "wasted_tasks": 0, "started": 1.8e9 + i, "seconds": 1.5,
            "limit": 60.0, "drain": True, "left": True, "rejoined": 0, "keep_out": False,
            "leaving": True}


async def test_a_status_with_more_records_than_its_bound_is_read_in_part(caplog):
    """A plugin that never forgets the records of workers whose pods went (1,500
    Deployments deleted by someone else) answers every status with them all: the
    operator reads the first MAX_STATUS_ITEMS, says so, and its passes still work."""
    from dask_memory_operator.api.memorypolicy import parse_spec
    from dask_memory_operator.schedulers.converge import ClusterReconciler

    records = [gone_worker_record(i) for i in range(1500)]
    async with Scheduler(dashboard_address=":0", port=0) as s:
        assert await install.ensure_plugin(s.address) == "live"
        plugin = s.plugins[PLUGIN_NAME]
        honest = plugin.status

        def hoarding() -> dict[str, Any]:
            return {**honest(), "retirements": records, "truncated": "forged"}

        plugin.status = hoarding  # what amm_core_apply answers with, too
        s.handlers["amm_core_status"] = hoarding

        status = await rpc.get_status(s.address)
        assert status["retirements"] == records[: rpc.MAX_STATUS_ITEMS]
        assert status[rpc.TRUNCATED] == {"retirements": 1500}  # the operator's, not forged
        assert "'retirements' (1500 items)" in caplog.text
        assert len(await rpc.retirements(s.address)) == rpc.MAX_STATUS_ITEMS

        # A whole pass of the cluster: applied, and its message says what was cut
        wanted = parse_spec({"clusterSelector": {}, "activeMemoryManager": {"interval": "1s"}})
        reconciler = ClusterReconciler(Locator({"c": s.address}), rpc_timeout=10)
        outcome = await reconciler.converge("ns", "c", wanted, owner())
        assert outcome.state == "Applied", outcome.message
        assert outcome.amm["interval"] == "1s"
        assert "cut to their first 1000: 'retirements' (1500 items)" in outcome.message


async def test_items_past_the_bound_are_stepped_over_but_still_framed():
    """What is not read is not built, yet its framing is checked: an ext type or a
    message cut short past the bound is refused all the same."""
    from dask_memory_operator.schedulers.wire import PlainReader, Refused

    many = list(range(rpc.MAX_STATUS_ITEMS + 5)) + [{"k": ["deep", {"x": b"b"}]}, "s" * 300]
    reader = PlainReader(msgpack.packb({"xs": many}), max_items=rpc.MAX_STATUS_ITEMS)
    assert reader.read() == {"xs": many[: rpc.MAX_STATUS_ITEMS]}
    assert reader.truncated == [("xs", len(many))]
    assert reader.values < 2 * rpc.MAX_STATUS_ITEMS
    for bad, why in [
        (msgpack.packb({"xs": many + [msgpack.ExtType(1, b"x")]}), "extension type"),
        (msgpack.packb({"xs": many})[:-5], "truncated message"),
    ]:
        with pytest.raises(Refused, match=why):
            PlainReader(bad, max_items=rpc.MAX_STATUS_ITEMS).read()
