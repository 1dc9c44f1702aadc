"""Bounded by construction: what a tenant writes and what a scheduler answers cannot
make the operator's messages, memory or stack grow past small bounds.

- untrusted text is described in one bounded line (dask_memory_operator.untrusted);
- a MemoryPolicy nested 1,200 deep or of 1.3 MB is Invalid with a clear message,
  found without recursion and in little time, and the index keeps little of it;
- JSON nested as deep as the API server accepts (10,000) decodes and diffs in an
  operator process without overflowing the stack; the emulator refuses deeper JSON
  as the API server does, and enforces the CRD's new bounds;
- a real distributed Server answering a 4 MiB refused reply gives a bounded message;
- class globs: ``*`` stays within one dotted name, and the scheduler checks a class
  against its allow list before it imports anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import aiohttp
import dask
import kopf
import pytest
import yaml
from distributed.core import Server

from amm_core.config import class_allowed, policy_class
from dask_memory_operator.api.memorypolicy import InvalidPolicy, index_body, parse_spec, resolve_policy_class
from dmo_devstack.apiserver import ApiServer
from dask_memory_operator.schedulers import rpc as scheduler_rpc
from dask_memory_operator.schedulers.converge import error_outcome
from dask_memory_operator.untrusted import describe, raise_recursion_limit

ROOT = Path(__file__).resolve().parents[1]


def nested(depth: int, leaf: object = 1) -> dict:
    value: object = leaf
    for _ in range(depth):
        value = {"a": value}
    return value  # type: ignore[return-value]


def policy(args: object, name: str = "p") -> dict:
    return {
        "apiVersion": "amm.dask.org/v1alpha1", "kind": "MemoryPolicy",
        "metadata": {"name": name, "namespace": "t", "uid": "u1", "generation": 1,
                     "annotations": {"kopf.zalando.org/last-handled-configuration": "x" * 100_000},
                     "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]},
        "spec": {"clusterSelector": {}, "activeMemoryManager": {"policies": [{"class": "Rebalance", "args": args}]}},
    }


# --- describing untrusted text -----------------------------------------------------


def test_untrusted_text_is_one_bounded_line():
    raw = "line one\nline two\r\x1b[31m\u202e" + "x" * 4 * 2**20
    text = describe(raw, 200)
    assert len(text) <= 200 and "\n" not in text and "\x1b" not in text and "\u202e" not in text
    assert text.startswith("line one\\nline two\\r\\x1b[31m\\u202e")
    assert text.endswith(f"({len(raw)} characters)")
    assert describe("short") == "short"
    assert len(describe({"k" * 2**20: ["v" * 2**20] * 100})) <= 512


# --- the deep and the huge policy, in the operator's check -------------------------


@pytest.mark.parametrize("args, message", [
    (nested(1_200), "policies[0].args.a.a.a.a.a.a.a.a: nested more than 12 levels deep"),
    ({"a": "x" * 1_300_000}, "spec: larger than the limit of 256 KiB"),
    ({"a": ["x" * 1000] * 100}, "args: larger than the limit of 16 KiB"),
    (nested(5), "args.a.a.a.a: nested more than 4 levels deep"),
    ({"x": {"__Enum__": 1}}, "args: may not contain the key '__Enum__'"),
])
def test_deep_and_huge_args_are_invalid_with_a_clear_message(args, message):
    started = time.perf_counter()
    with pytest.raises(InvalidPolicy) as info:
        parse_spec(policy(args)["spec"])
    assert time.perf_counter() - started < 0.05  # stops at the first excess
    assert message in str(info.value) and len(str(info.value)) < 1200


def test_args_within_bounds_are_valid():
    parse_spec(policy({"threshold": 0.1, "max_bytes_per_cycle": "10MiB"})["spec"])


def test_the_index_keeps_little_of_a_policy():
    huge = policy({"a": "x" * 1_300_000})
    kept = index_body(huge, valid=False)
    assert len(json.dumps(kept)) < 1000
    assert kept["spec"] == {"clusterSelector": {}} and kept["metadata"]["uid"] == "u1"
    valid = policy({"threshold": 0.1})
    kept = index_body(valid, valid=True)
    assert kept["spec"] == valid["spec"] and "annotations" not in kept["metadata"]


def test_kopfs_copy_of_a_large_spec_is_a_digest():
    """kopf's last-handled-configuration annotation stays far below the API server's
    256 KiB of annotations, and still tells a change from a replay."""
    from dask_memory_operator.controllers.diffbase import MAX_ESSENCE, BoundedDiffBaseStorage

    storage = BoundedDiffBaseStorage(prefix="amm.dask.org", key="last-handled-configuration")

    def essence(args: object) -> dict:
        return storage.build(body=kopf.Body(policy(args)))

    huge = essence({f"k{i}": ["x" * 4000] * 10 for i in range(32)})
    assert len(json.dumps(huge)) < 1024 and set(huge["spec"]) == {"sha256", "length"}
    assert huge == essence({f"k{i}": ["x" * 4000] * 10 for i in range(32)})
    assert huge != essence({f"k{i}": ["y" * 4000] * 10 for i in range(32)})
    small = essence({"threshold": 0.1})
    assert small["spec"] == policy({"threshold": 0.1})["spec"] and len(json.dumps(small)) < MAX_ESSENCE


# --- JSON as deep as the API server takes, in an operator process -------------------


def test_an_operator_process_decodes_and_diffs_10000_deep_json():
    """In a fresh interpreter, as `dask-memory-operator run` starts: kopf's own
    decoding, copy, diff and encoding of an object nested 10,000 deep, in a thread
    (whose C stack is the smaller), neither raise nor overflow the C stack; also with
    the pure-Python scanner, which takes over where the C decoder stops sooner (3.12+).
    The main thread decodes and copies only: kopf's diff of it takes seconds."""
    script = textwrap.dedent("""
        import copy, json, threading
        from kopf._cogs.structs import diffs
        from dask_memory_operator.untrusted import decode_as_deep_as_the_api_server, raise_recursion_limit
        raise_recursion_limit()
        text = '{"spec":' + '{"a":' * 9_999 + '1' + '}' * 10_000
        def work(diff):
            body = json.loads(text)
            other = json.loads(text.replace('1', '2', 1))
            essence = copy.deepcopy(body)
            assert not diff or list(diffs.diff(essence, other))
            assert len(json.dumps(essence, separators=(",", ":"))) == len(text) and repr(essence)
        for force_python in (False, True):
            if force_python:
                assert decode_as_deep_as_the_api_server(force_python=True)
            work(diff=False)
            failed = []
            def in_thread():
                try:
                    work(diff=True)
                except BaseException as e:
                    failed.append(repr(e)[:500])
            t = threading.Thread(target=in_thread)
            t.start(); t.join()
            assert not failed, failed
            print("ok", force_python)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # the code under test
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and done.stdout.split() == ["ok", "False", "ok", "True"], done.stderr[-2000:]


# --- the emulator, as the API server --------------------------------------------------


async def test_the_api_server_refuses_json_past_10000_levels_and_enforces_the_crd_bounds():
    raise_recursion_limit()  # this test's own json.dumps of the deep bodies
    async with ApiServer(crd_dirs=[ROOT / "crds"]) as server, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        await server.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "t"}})
        url = f"{server.url}/apis/amm.dask.org/v1alpha1/namespaces/t/memorypolicies"

        async def create(name: str, args: object) -> tuple[int, dict]:
            body = policy(args, name)
            body["metadata"] = {"name": name}
            async with http.post(url, data=json.dumps(body), headers={"Content-Type": "application/json"}) as r:
                return r.status, await r.json()

        # 10,000 levels in all are taken (into args), 10,001 are not
        status, _ = await create("deepest", nested(10_000 - 5))  # 5 levels above args
        assert status == 201
        status, answer = await create("too-deep", nested(10_000 - 4))
        assert status == 400 and answer["reason"] == "BadRequest"
        assert answer["message"] == (
            "the object provided is unrecognized (must be of type MemoryPolicy): couldn't get "
            "version/kind; json parse error: invalid character '{' exceeded max depth "
            '({"apiVersion": "amm.dask.org/v ...)')  # its first 30 bytes
        async with http.get(f"{url}/deepest") as r:
            assert r.status == 200 and len(await r.read()) > 60_000
        # the CRD's bounds
        status, answer = await create("many", {f"k{i}": i for i in range(33)})
        assert status == 422
        assert "spec.activeMemoryManager.policies[0].args: Too many: 33: must have at most 32 items" \
            in answer["message"]
        status, answer = await create("long", {"k": "x" * 5000})
        assert status == 422 and "args.k: Too long: may not be more than 4096 bytes" in answer["message"]
        status, answer = await create("list", {"k": list(range(300))})
        assert status == 422 and "Too many: 300: must have at most 256 items" in answer["message"]
        # a request body is read up to kube-apiserver's 3 MiB (not aiohttp's 1 MiB)
        status, _ = await create("big", {f"k{i}": ["x" * 4000] * 10 for i in range(32)})  # 1.3 MB
        assert status == 201
        status, answer = await create("bigger", {f"k{i}": ["x" * 4000] * 25 for i in range(32)})
        assert status == 413 and answer["reason"] == "RequestEntityTooLarge"
        assert answer["message"] == "Request entity too large: limit is 3145728"
        assert server.emulator.errors == []


def test_the_crd_bounds_every_list_and_string_of_the_spec():
    crd = yaml.safe_load((ROOT / "crds" / "memorypolicy.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    unbounded = []
    stack = [("spec", spec)]
    while stack:
        path, node = stack.pop()
        if node.get("type") == "array" and "maxItems" not in node:
            unbounded.append(path)
        if node.get("type") == "string" and "maxLength" not in node and "enum" not in node:
            unbounded.append(path)
        if node.get("type") == "object" and isinstance(node.get("additionalProperties"), dict) \
                and "maxProperties" not in node:
            unbounded.append(path)
        for key, sub in (node.get("properties") or {}).items():
            stack.append((f"{path}.{key}", sub))
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                stack.append((f"{path}.{key}", node[key]))
    assert unbounded == []


# --- a scheduler's 4 MiB refused reply ----------------------------------------------


class Opaque:
    """Goes as a pickle: refused by the operator's reader at its (huge) key."""


async def test_a_4mib_refused_reply_of_a_real_server_becomes_a_bounded_message():
    key = "k\n" * (2**20 - 2**16)  # near 4 MiB (the reader's limit for a whole message), with newlines

    async def status(comm=None, **kwargs):
        return {key: Opaque()}

    server = Server({"amm_core_status": status})
    await server.listen("tcp://127.0.0.1:0")
    try:
        with pytest.raises(scheduler_rpc.SchedulerProtocolError) as info:
            await scheduler_rpc.get_status(server.address, timeout=10)
    finally:
        await server.close()
    text = str(info.value)
    assert len(text) < 2048 and "\n" not in text
    assert "pickled object" in text and f"({len(key)} characters)" in text
    outcome = error_outcome("c", info.value)
    assert outcome.state == "Degraded" and len(outcome.message) <= 1024 and "\n" not in outcome.message


# --- class globs and the scheduler's allow list --------------------------------------


def test_a_star_stays_within_one_dotted_name():
    assert class_allowed("mycorp.amm.Keep", ["mycorp.amm.*"])
    assert not class_allowed("mycorp.amm.sub.Keep", ["mycorp.amm.*"])
    assert not class_allowed("mycorp.ammx.Keep", ["mycorp.amm.*"])
    assert class_allowed("mycorp.amm.sub.Keep", ["mycorp.amm.**"])
    assert resolve_policy_class("mycorp.amm.Keep", ["mycorp.amm.*"]) == "mycorp.amm.Keep"
    with pytest.raises(InvalidPolicy, match="not allowed"):
        resolve_policy_class("mycorp.amm.os.system", ["mycorp.amm.*"])


def test_the_scheduler_checks_the_allow_list_before_importing(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "sideeffect_mod.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass NotAPolicy:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="not allowed on this scheduler"):
        policy_class("sideeffect_mod.NotAPolicy")
    assert not marker.exists() and "sideeffect_mod" not in sys.modules
    with dask.config.set({"amm-core.allowed-policy-classes": ["sideeffect_mod.*"]}):
        with pytest.raises(ValueError, match="is not an AMM policy"):
            policy_class("sideeffect_mod.NotAPolicy")
    assert policy_class("Rebalance").__name__ == "Rebalance"
