"""``dask-memory-operator check``: is the installed operator working? (the chart's
``helm test``).

Two questions, each answered with one plain request, so that the test pod needs no
more than ``get`` on one named CustomResourceDefinition:

- the MemoryPolicy CRD has the condition ``Established=True`` (``GET`` of the named
  CRD, never a list: kr8s' ``get(name)`` lists with a field selector, which would need
  the ``list`` verb);
- the operator's kopf liveness endpoint answers ``200``.

Both are retried until ``--timeout`` passes (``helm test`` may run while the operator
still starts), then the command exits non-zero naming what failed and why.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx
import kr8s.asyncio

#: The CRD the operator serves
DEFAULT_CRD = "memorypolicies.amm.dask.org"


@dataclass
class Finding:
    ok: bool
    message: str


async def crd_established(name: str) -> Finding:
    """Whether the CRD ``name`` exists with ``Established=True``."""
    try:
        api = await kr8s.asyncio.api()
        async with api.call_api("GET", version="apiextensions.k8s.io/v1", base="/apis",
                                url=f"customresourcedefinitions/{name}", raise_for_status=False) as r:
            status, body = r.status_code, (r.json() if r.content else {})
    except (httpx.HTTPError, OSError, ValueError) as e:
        return Finding(False, f"CRD {name}: the API server did not answer: {e}")
    if status != 200:
        detail = body.get("message") if isinstance(body, dict) else None
        return Finding(False, f"CRD {name}: HTTP {status}: {detail or 'no message'}")
    for condition in (body.get("status") or {}).get("conditions") or ():
        if condition.get("type") == "Established":
            if condition.get("status") == "True":
                return Finding(True, f"CRD {name} is Established")
            return Finding(False, f"CRD {name} is not Established: {condition.get('reason')}: "
                                  f"{condition.get('message')}")
    return Finding(False, f"CRD {name} has no Established condition yet")


async def healthz(url: str) -> Finding:
    """Whether the operator's liveness endpoint answers 200."""
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            r = await client.get(url)
    except httpx.HTTPError as e:
        return Finding(False, f"operator liveness {url}: no answer: {e!r}")
    if r.status_code != 200:
        return Finding(False, f"operator liveness {url}: HTTP {r.status_code}: {r.text[:200]}")
    return Finding(True, f"operator liveness {url}: 200")


async def check(crd: str, healthz_url: str | None, timeout: float, interval: float = 1.0) -> list[Finding]:
    """Each question asked until it passes or ``timeout`` seconds pass; the last answers."""
    deadline = time.monotonic() + timeout
    while True:
        findings = [await crd_established(crd)]
        if healthz_url:
            findings.append(await healthz(healthz_url))
        if all(f.ok for f in findings) or time.monotonic() >= deadline:
            return findings
        await asyncio.sleep(interval)


def main(crd: str, healthz_url: str | None, timeout: float) -> int:
    findings = asyncio.run(check(crd, healthz_url, timeout))
    for f in findings:
        print(("ok: " if f.ok else "FAILED: ") + f.message, flush=True)
    return 0 if all(f.ok for f in findings) else 1
