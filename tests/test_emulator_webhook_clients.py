"""
The emulator presents client credentials to admission webhooks as kube-apiserver does
when its ``--admission-control-config-file`` names a kubeconfig (AdmissionConfiguration,
WebhookAdmission ``kubeConfigFile``): the user for the webhook's ``host:port`` is picked
as AuthenticationInfoResolver picks it, and its client certificate goes into the TLS
handshake. The webhook here is a real HTTPS server that requires client certificates.
"""
from __future__ import annotations

import base64
import pathlib
import ssl
from typing import Any

import aiohttp
import aiohttp.web
import pytest
import yaml

from dmo_devstack.apiserver import ApiServer
from dmo_devstack.emulator.admission import resolve_webhook_user, webhook_kubeconfig_path
from dask_memory_operator.webhook.certs import write_client_ca, write_client_cert, write_webhook_certs
from test_emulator import Http
from test_emulator_admission import PODS, add_label, configure, hook, pod


def admission_configuration(folder: pathlib.Path, kubeconfig: pathlib.Path | str) -> pathlib.Path:
    path = folder / 'admission.yaml'
    path.write_text(yaml.safe_dump({
        'apiVersion': 'apiserver.config.k8s.io/v1', 'kind': 'AdmissionConfiguration',
        'plugins': [{'name': 'MutatingAdmissionWebhook', 'configuration': {
            'apiVersion': 'apiserver.config.k8s.io/v1', 'kind': 'WebhookAdmission',
            'kubeConfigFile': str(kubeconfig)}}]}))
    return path


def write_users(path: pathlib.Path, users: dict[str, dict[str, Any]]) -> None:
    path.write_text(yaml.safe_dump({'apiVersion': 'v1', 'kind': 'Config', 'clusters': [], 'contexts': [],
                                    'users': [{'name': n, 'user': u} for n, u in users.items()]}))


def test_the_user_is_picked_as_kube_apiserver_picks_it() -> None:
    config = {'users': [{'name': n, 'user': {'token': n}} for n in
                        ('hook.ns.svc:8443', '*.ns.svc:443', 'example.com', '*')]}
    pick = lambda target: resolve_webhook_user(config, target).get('token')  # noqa: E731
    assert pick('hook.ns.svc:8443') == 'hook.ns.svc:8443'  # exact
    assert pick('other.ns.svc:443') == '*.ns.svc:443'  # star-prefixed
    assert pick('example.com:443') == 'example.com'  # without the default port
    assert pick('example.com:8443') == '*'  # the port counts otherwise
    assert resolve_webhook_user({'users': []}, 'x:443') == {}  # anonymous
    current = {'current-context': 'c', 'contexts': [{'name': 'c', 'context': {'user': 'u'}}],
               'users': [{'name': 'u', 'user': {'token': 't'}}]}
    assert resolve_webhook_user(current, 'x:443') == {'token': 't'}


def test_a_relative_kubeconfig_path_is_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match='must be an absolute file path'):
        webhook_kubeconfig_path(admission_configuration(tmp_path, 'relative/kubeconfig'))
    assert webhook_kubeconfig_path(admission_configuration(tmp_path, tmp_path / 'k')) == str(tmp_path / 'k')


async def test_the_webhook_gets_the_client_certificate_named_for_its_host(tmp_path: pathlib.Path) -> None:
    write_webhook_certs(tmp_path / 'serving', ['localhost'], ['127.0.0.1'])
    write_client_ca(tmp_path / 'clients')
    cert, key = write_client_cert(tmp_path / 'clients', 'kube-apiserver')
    seen: list[Any] = []

    async def mutate(request: aiohttp.web.Request) -> aiohttp.web.Response:
        peer = request.transport.get_extra_info('peercert') if request.transport else None
        seen.append(dict(x[0] for x in peer['subject'])['commonName'])
        review = await request.json()
        return aiohttp.web.json_response({'apiVersion': 'admission.k8s.io/v1', 'kind': 'AdmissionReview',
                                          'response': {'uid': review['request']['uid'], 'allowed': True,
                                                       **add_label('client', 'verified')(review['request'])}})

    app = aiohttp.web.Application()
    app.router.add_post('/mutate', mutate)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / 'serving' / 'tls.crt', tmp_path / 'serving' / 'tls.key')
    context.verify_mode = ssl.CERT_REQUIRED  # no certificate of the client CA: no handshake
    context.load_verify_locations(tmp_path / 'clients' / 'client-ca.crt')
    site = aiohttp.web.TCPSite(runner, '127.0.0.1', 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    users = tmp_path / 'webhook-kubeconfig'
    write_users(users, {f'127.0.0.1:{port}': {'client-certificate': str(cert), 'client-key': str(key)}})
    ca = base64.b64encode((tmp_path / 'serving' / 'ca.crt').read_bytes()).decode()
    try:
        async with ApiServer(admission_control_config_file=admission_configuration(tmp_path, users)) as server, \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            http = Http(server.url, session)
            await configure(http, hook(f'https://127.0.0.1:{port}/mutate', ca))
            status, created = await http.post(PODS, pod('a'))
            assert status == 201 and created['metadata']['labels'] == {'client': 'verified'}, created
            assert seen == ['kube-apiserver']

            # read again when it changes: a user for another host only, so none for this one
            write_users(users, {'127.0.0.1:1': {'client-certificate': str(cert), 'client-key': str(key)}})
            status, error = await http.post(PODS, pod('b'))
            assert status == 500 and 'failed calling webhook' in error['message'], error
            assert seen == ['kube-apiserver']
            # inline data, as kubeconfigs often carry it
            write_users(users, {f'127.0.0.1:{port}': {
                'client-certificate-data': base64.b64encode(cert.read_bytes()).decode(),
                'client-key-data': base64.b64encode(key.read_bytes()).decode()}})
            status, created = await http.post(PODS, pod('c'))
            assert status == 201 and created['metadata']['labels'] == {'client': 'verified'}, created
    finally:
        await runner.cleanup()
