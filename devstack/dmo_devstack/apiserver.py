"""
Run the Kubernetes API emulator over HTTP: in-process (``ApiServer``) or as a command.

    python -m dmo_devstack.apiserver --port 0 --kubeconfig PATH [--crds DIR ...]
        [--service-cidr CIDR] [--watch-window EVENTS] [--audit-log-path PATH]
        [--admission-control-config-file PATH]

The command serves on 127.0.0.1, applies the CRD yaml files found in the given
folders, and only then writes a kubeconfig (server ``http://127.0.0.1:<port>``, one
context, namespace ``default``) to PATH through a temporary file and a rename: a
process polling for the file sees either nothing or a complete file of a server that
answers. It serves until SIGTERM or SIGINT and then exits cleanly (watch streams are
ended first, so no client is left hanging on them). ``--audit-log-path`` appends the
audit log, as kube-apiserver's flag of that name (JSON lines, level Metadata; see
emulator/audit.py). ``--admission-control-config-file`` is kube-apiserver's: an
AdmissionConfiguration naming the kubeconfig whose users' client certificates (or tokens)
the API server presents to admission webhooks (emulator/admission.py). The kubeconfig carries no credentials: such requests are the
unrestricted admin; a service account's bearer token (TokenRequest) is authorized by
RBAC (emulator/authn.py, emulator/rbac.py).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import signal
import tempfile
from collections.abc import Iterable
from typing import Any

import aiohttp
import kmock
import yaml

from dmo_devstack.emulator import KubeEmulator


def _client_session(url: Any) -> aiohttp.ClientSession:
    # kmock's own test client: without force_close, a pooled keep-alive connection
    # can hang after the server restarts.
    return aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(force_close=True))


class ApiServer:
    """An emulated Kubernetes API server on 127.0.0.1, as an async context manager."""

    def __init__(self, port: int = 0, *, host: str = '127.0.0.1', service_cidr: str = '127.1.0.0/16',
                 crd_dirs: Iterable[str | os.PathLike[str]] = (), watch_window: int = 10_000,
                 bookmark_interval: float = 60.0, audit_log_path: str | os.PathLike[str] | None = None,
                 admission_control_config_file: str | os.PathLike[str] | None = None) -> None:
        #: The emulator: its ``objects`` and ``resources`` are there for assertions.
        self.emulator: KubeEmulator = KubeEmulator(service_cidr=service_cidr, watch_window=watch_window,
                                                   bookmark_interval=bookmark_interval,
                                                   audit_log_path=audit_log_path)
        self.emulator.configure_admission(admission_control_config_file)
        self._host: str = host
        self._port: int = port
        self._crd_dirs: list[pathlib.Path] = [pathlib.Path(d) for d in crd_dirs]
        self._server: kmock.Server | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``, without a trailing slash."""
        if self._server is None:
            raise RuntimeError('The API server is not running.')
        return str(self._server.url).rstrip('/')

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError('The API server is not running.')
        return self._server.port

    async def __aenter__(self) -> ApiServer:
        await self.emulator.__aenter__()
        self._server = kmock.Server(self.emulator, host=self._host, port=self._port or None,
                                    client_fct=_client_session)
        await self._server.__aenter__()
        for folder in self._crd_dirs:
            await self.apply_files(sorted(folder.glob('*.yaml')) + sorted(folder.glob('*.yml')))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.emulator.stop_watches()
        if self._server is not None:
            await self._server.__aexit__(*exc)
            self._server = None
        await self.emulator.__aexit__(*exc)

    async def apply_files(self, paths: Iterable[pathlib.Path]) -> None:
        """Create (or replace) every CustomResourceDefinition in these yaml files."""
        for path in paths:
            # The C loader when there is one: dask-kubernetes' CRDs are ~20,000 lines.
            for doc in yaml.load_all(path.read_text(), Loader=getattr(yaml, 'CSafeLoader', yaml.SafeLoader)):
                if isinstance(doc, dict) and doc.get('kind') == 'CustomResourceDefinition':
                    await self.apply(doc)

    async def apply(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Create or replace one object, as ``kubectl apply`` would."""
        return await self.emulator.apply(doc)


def write_kubeconfig(path: pathlib.Path, url: str, namespace: str = 'default') -> None:
    """Write a kubeconfig atomically (temporary file in the same folder, then rename)."""
    config = {
        'apiVersion': 'v1', 'kind': 'Config', 'current-context': 'emulator', 'preferences': {},
        'clusters': [{'name': 'emulator', 'cluster': {'server': url}}],
        'users': [{'name': 'emulator', 'user': {}}],
        'contexts': [{'name': 'emulator', 'context': {
            'cluster': 'emulator', 'user': 'emulator', 'namespace': namespace}}],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    with os.fdopen(fd, 'w') as f:
        yaml.safe_dump(config, f)
    os.replace(tmp, path)


async def serve(port: int, kubeconfig: pathlib.Path, crd_dirs: list[str], service_cidr: str,
                watch_window: int, audit_log_path: pathlib.Path | None = None,
                admission_control_config_file: pathlib.Path | None = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with ApiServer(port, service_cidr=service_cidr, crd_dirs=crd_dirs, watch_window=watch_window,
                         audit_log_path=audit_log_path,
                         admission_control_config_file=admission_control_config_file) as server:
        write_kubeconfig(kubeconfig, server.url)
        print(f'Kubernetes API emulator serving at {server.url}', flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--port', type=int, default=0, help='TCP port on 127.0.0.1 (0: a free one)')
    parser.add_argument('--kubeconfig', type=pathlib.Path, required=True,
                        help='where to write the kubeconfig once serving')
    parser.add_argument('--crds', action='append', default=[], metavar='DIR',
                        help='a folder of CRD yaml files to apply at start (repeatable)')
    parser.add_argument('--service-cidr', default='127.1.0.0/16',
                        help='where Service cluster IPs are allocated from')
    parser.add_argument('--watch-window', type=int, default=10_000, metavar='EVENTS',
                        help='watch events kept for resumption; older resourceVersions get 410 Expired')
    parser.add_argument('--audit-log-path', type=pathlib.Path, metavar='PATH',
                        help='append the audit log here (JSON lines of audit.k8s.io/v1 Events)')
    parser.add_argument('--admission-control-config-file', type=pathlib.Path, metavar='PATH',
                        help="an AdmissionConfiguration: the kubeconfig of webhooks' client credentials")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.kubeconfig, args.crds, args.service_cidr, args.watch_window,
                      args.audit_log_path, args.admission_control_config_file))


if __name__ == '__main__':
    main()
