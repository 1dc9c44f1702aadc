"""The live install of amm_core on a scheduler whose image lacks it (or runs other
amm_core code than the operator's): the package zip, the module that reloads it, and
:func:`ensure_plugin`, which the operator calls before it applies a config. This is
the only place where the operator sends pickles, and only to the scheduler.

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

import functools
import hashlib
import io
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import SchedulerUploadFile
from distributed.protocol.pickle import dumps

import amm_core
from amm_core.plugin import PLUGIN_NAME, MemoryPolicyPlugin
from dask_memory_operator.schedulers.rpc import (
    PluginMissing,
    SchedulerCallFailed,
    _call,
    get_status,
)

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
    status, _ = await ensure_plugin_status(address, timeout=timeout)
    return status["source"]


async def ensure_plugin_status(
    address: str, *, timeout: float | None = None
) -> tuple[dict[str, Any], list[str]]:
    """What :func:`ensure_plugin` does, returning the scheduler's status afterwards
    and what was done to get there, each a sentence for an Event."""
    actions = []
    try:
        status = await get_status(address, timeout=timeout)
    except PluginMissing:
        status = await _install(address, timeout)
        actions.append("installed the amm_core plugin on the scheduler (live)")
    other_code = skew(status)
    if status.get("source") == "live" and other_code:
        status = await _replace(address, timeout)
        actions.append(f"replaced the live amm_core plugin: {other_code}")
    source = status.get("source")
    if source not in ("preload", "live"):
        raise SchedulerCallFailed(
            f"scheduler {address} reports an amm_core plugin of source {source!r}",
            "",
            "",
        )
    return status, actions
