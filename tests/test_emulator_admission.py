"""
The emulator calls mutating admission webhooks as kube-apiserver does: a real HTTPS
webhook server (aiohttp, a CA and a server certificate made here with ``cryptography``)
and kubectl creating and patching Pods through the in-process API server.
"""
from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import pathlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import aiohttp.web
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dmo_devstack.apiserver import ApiServer, write_kubeconfig
from test_emulator import KUBECTL, Http, http, kubectl_env, server

__all__ = ['http', 'server']  # fixtures used here

MWC = '/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations'
PODS = '/api/v1/namespaces/default/pods'
SERVICE_IP = '127.1.200.7'  # in the emulator's service CIDR, bindable on loopback


# ---------------------------------------------------------------- certificates

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope='module')
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A CA, a server certificate it signed (127.0.0.1, localhost, hook.default.svc), a foreign CA."""
    folder = tmp_path_factory.mktemp('certs')
    ca_key, ca = make_ca('test-ca')
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    sans = [x509.DNSName('localhost'), x509.DNSName('hook.default.svc'),
            x509.IPAddress(ipaddress.ip_address('127.0.0.1')), x509.IPAddress(ipaddress.ip_address(SERVICE_IP))]
    cert = (x509.CertificateBuilder().subject_name(_name('webhook')).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (folder / 'tls.crt').write_bytes(pem(cert))
    (folder / 'tls.key').write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    return {'cert': folder / 'tls.crt', 'key': folder / 'tls.key',
            'ca': base64.b64encode(pem(ca)).decode(), 'foreign': base64.b64encode(pem(make_ca('other')[1])).decode()}


# ---------------------------------------------------------------- a webhook server

class Webhook:
    """An HTTPS admission webhook; ``answer(request) -> response`` decides, reviews are kept."""

    def __init__(self) -> None:
        self.reviews: list[dict[str, Any]] = []
        self.answer: Callable[[dict[str, Any]], Any] = lambda request: {}
        self.url = ''

    async def handle(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        review = await request.json()
        self.reviews.append({**review, 'query': dict(request.query), 'host': request.host})
        extra = self.answer(review['request'])
        if asyncio.iscoroutine(extra):
            extra = await extra
        if isinstance(extra, aiohttp.web.Response):
            return extra
        return aiohttp.web.json_response({'apiVersion': 'admission.k8s.io/v1', 'kind': 'AdmissionReview',
                                          'response': {'uid': review['request']['uid'], 'allowed': True, **extra}})


async def serve_webhook(webhook: Webhook, certs: dict[str, Any], host: str = '127.0.0.1',
                        port: int = 0) -> aiohttp.web.AppRunner:
    app = aiohttp.web.Application()
    app.router.add_post('/mutate', webhook.handle)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs['cert'], certs['key'])
    site = aiohttp.web.TCPSite(runner, host, port, ssl_context=context)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    webhook.url = f'https://{host}:{bound}/mutate'
    return runner


@pytest.fixture
async def webhook(certs: dict[str, Any]) -> AsyncIterator[Webhook]:
    hook = Webhook()
    runner = await serve_webhook(hook, certs)
    yield hook
    await runner.cleanup()


@pytest.fixture
def kubeconfig(server: ApiServer, tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / 'kube' / 'config'
    write_kubeconfig(path, server.url)
    return path


async def kubectl(kubeconfig: pathlib.Path, *args: str, input: Any = None) -> tuple[int, str, str]:
    """kubectl as a subprocess, without blocking the loop that serves the API and the webhook."""
    proc = await asyncio.create_subprocess_exec(
        KUBECTL, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=kubectl_env(kubeconfig))
    data = None if input is None else json.dumps(input).encode()
    out, err = await asyncio.wait_for(proc.communicate(data), 60)
    return proc.returncode or 0, out.decode(), err.decode()


def hook(url: str, ca: str | None, **fields: Any) -> dict[str, Any]:
    """One webhook on Pod CREATE (fields override)."""
    client: dict[str, Any] = {'url': url}
    if ca is not None:
        client['caBundle'] = ca
    return {'name': 'pods.mutate.example.com', 'clientConfig': client, 'sideEffects': 'None',
            'admissionReviewVersions': ['v1'], 'rules': [{'operations': ['CREATE'], 'apiGroups': [''],
                                                          'apiVersions': ['v1'], 'resources': ['pods']}], **fields}


async def configure(http: Http, *webhooks: dict[str, Any], name: str = 'pod-mutator') -> None:
    status, body = await http.post(MWC, {'apiVersion': 'admissionregistration.k8s.io/v1',
                                         'kind': 'MutatingWebhookConfiguration',
                                         'metadata': {'name': name}, 'webhooks': list(webhooks)})
    assert status == 201, body


def pod(name: str, **labels: str) -> dict[str, Any]:
    return {'apiVersion': 'v1', 'kind': 'Pod', 'metadata': {'name': name, 'labels': labels},
            'spec': {'containers': [{'name': 'c', 'image': 'busybox'}]}}


def add_label(key: str, value: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def answer(request: dict[str, Any]) -> dict[str, Any]:
        ops = [{'op': 'add', 'path': f'/metadata/labels/{key}', 'value': value}]
        return {'patchType': 'JSONPatch', 'patch': base64.b64encode(json.dumps(ops).encode()).decode()}
    return answer


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- tests

async def test_configuration_is_served_defaulted_and_validated(http: Http, kubeconfig: pathlib.Path) -> None:
    status, err = await http.post(MWC, {'metadata': {'name': 'bad'}, 'webhooks': [{
        'name': 'short', 'clientConfig': {'url': 'http://x/m'}, 'timeoutSeconds': 31,
        'admissionReviewVersions': ['v2'],
        'rules': [{'operations': ['GET'], 'apiGroups': [''], 'apiVersions': ['v1'], 'resources': ['pods']}]}]})
    assert status == 422 and err['reason'] == 'Invalid'
    assert [(c['field'], c['message']) for c in err['details']['causes']] == [
        ('webhooks[0].name', 'Invalid value: "short": should be a domain with at least three segments separated by dots'),
        ('webhooks[0].rules[0].operations[0]',
         'Unsupported value: "GET": supported values: "*", "CONNECT", "CREATE", "DELETE", "UPDATE"'),
        ('webhooks[0].sideEffects', 'Required value: must specify one of None, NoneOnDryRun'),
        ('webhooks[0].timeoutSeconds', 'Invalid value: 31: the timeout value must be between 1 and 30 seconds'),
        ('webhooks[0].clientConfig.url',
         "Invalid value: \"http\": 'https' is the only allowed URL scheme; desired format: https://host[/path]"),
        ('webhooks[0].admissionReviewVersions', 'Invalid value: ["v2"]: must include at least one of v1, v1beta1')]
    status, err = await http.post(MWC, {'metadata': {'name': 'bad'}, 'webhooks': [
        {**hook('https://x/m', None), 'sideEffects': 'Some', 'admissionReviewVersions': []},
        {**hook('https://x/m', None), 'clientConfig': {}}]})
    assert [(c['field'], c['message']) for c in err['details']['causes']] == [
        ('webhooks[0].sideEffects', 'Unsupported value: "Some": supported values: "None", "NoneOnDryRun"'),
        ('webhooks[0].admissionReviewVersions', 'Required value: must specify one of v1, v1beta1'),
        ('webhooks[1].clientConfig', 'Required value: exactly one of url or service is required'),
        ('webhooks[1].name', 'Duplicate value: "pods.mutate.example.com"')]

    await configure(http, hook('https://127.0.0.1:1/mutate', None))
    _, stored = await http.get(f'{MWC}/pod-mutator')
    assert {k: stored['webhooks'][0][k] for k in ('failurePolicy', 'matchPolicy', 'namespaceSelector',
                                                   'objectSelector', 'timeoutSeconds', 'reinvocationPolicy')} == {
        'failurePolicy': 'Fail', 'matchPolicy': 'Equivalent', 'namespaceSelector': {}, 'objectSelector': {},
        'timeoutSeconds': 10, 'reinvocationPolicy': 'Never'}
    assert stored['webhooks'][0]['rules'][0]['scope'] == '*'
    code, out, err = await kubectl(kubeconfig, 'get', 'mutatingwebhookconfigurations')
    assert code == 0 and 'pod-mutator' in out, err
    code, out, err = await kubectl(kubeconfig, 'patch', 'mutatingwebhookconfiguration', 'pod-mutator', '--type=json',
                                   '-p', '[{"op": "replace", "path": "/webhooks/0/failurePolicy", "value": "Ignore"}]')
    assert code == 0, err
    code, out, err = await kubectl(kubeconfig, 'delete', 'mutatingwebhookconfiguration', 'pod-mutator')
    assert code == 0 and await http.gone(f'{MWC}/pod-mutator'), err


async def test_patch_applied_before_validation_and_storage(http: Http, kubeconfig: pathlib.Path,
                                                            webhook: Webhook, certs: dict[str, Any]) -> None:
    await configure(http, hook(webhook.url, certs['ca']))
    webhook.answer = add_label('governed', 'yes')
    code, out, err = await kubectl(kubeconfig, 'create', '-f', '-', input=pod('p1', app='web'))
    assert code == 0, err
    _, stored = await http.get(f'{PODS}/p1')
    assert stored['metadata']['labels'] == {'app': 'web', 'governed': 'yes'}
    [review] = webhook.reviews
    assert review['apiVersion'] == 'admission.k8s.io/v1' and review['kind'] == 'AdmissionReview'
    assert review['query'] == {'timeout': '10s'}
    request = review['request']
    assert {k: request[k] for k in ('kind', 'resource', 'requestKind', 'name', 'namespace', 'operation',
                                    'oldObject', 'dryRun')} == {
        'kind': {'group': '', 'version': 'v1', 'kind': 'Pod'},
        'resource': {'group': '', 'version': 'v1', 'resource': 'pods'},
        'requestKind': {'group': '', 'version': 'v1', 'kind': 'Pod'},
        'name': 'p1', 'namespace': 'default', 'operation': 'CREATE', 'oldObject': None, 'dryRun': False}
    assert request['options']['kind'] == 'CreateOptions' and request['userInfo']['username']
    obj = request['object']
    assert obj['metadata']['namespace'] == 'default' and 'uid' not in obj['metadata']  # before storage
    assert obj['spec']['restartPolicy'] == 'Always'  # after defaulting

    # The patched object is validated: a patch making the pod invalid is a 422, nothing stored.
    def break_image(request: dict[str, Any]) -> dict[str, Any]:
        ops = [{'op': 'replace', 'path': '/spec/containers/0/image', 'value': ''}]
        return {'patchType': 'JSONPatch', 'patch': base64.b64encode(json.dumps(ops).encode()).decode()}
    webhook.answer = break_image
    code, out, err = await kubectl(kubeconfig, 'create', '-f', '-', input=pod('p2'))
    assert code != 0 and 'spec.containers[0].image: Required value' in err
    assert await http.gone(f'{PODS}/p2')

    # A patch that does not apply: 500 whatever the failure policy.
    webhook.answer = lambda request: {'patchType': 'JSONPatch', 'patch': base64.b64encode(
        b'[{"op": "remove", "path": "/nope"}]').decode()}
    status, err = await http.post(PODS, pod('p3'))
    assert status == 500 and err['reason'] == 'InternalError' and err['message'].startswith('Internal error occurred: ')


async def test_webhooks_not_matching_are_not_called(http: Http, webhook: Webhook, certs: dict[str, Any]) -> None:
    webhook.answer = add_label('governed', 'yes')
    await http.post('/api/v1/namespaces', {'metadata': {'name': 'tenant', 'labels': {'team': 'a'}}})
    await configure(
        http,
        hook(webhook.url, certs['ca'], name='objects.mutate.example.com',
             objectSelector={'matchLabels': {'dask.org/component': 'worker'}}),
        hook(webhook.url, certs['ca'], name='namespaces.mutate.example.com',
             namespaceSelector={'matchExpressions': [{'key': 'team', 'operator': 'In', 'values': ['b']}]}),
        hook(webhook.url, certs['ca'], name='updates.mutate.example.com', rules=[
            {'operations': ['UPDATE'], 'apiGroups': [''], 'apiVersions': ['v1'], 'resources': ['pods']},
            {'operations': ['*'], 'apiGroups': ['apps'], 'apiVersions': ['v1'], 'resources': ['*']},
            {'operations': ['CREATE'], 'apiGroups': ['*'], 'apiVersions': ['*'], 'resources': ['pods/status']},
            {'operations': ['CREATE'], 'apiGroups': [''], 'apiVersions': ['v1'], 'resources': ['pods'],
             'scope': 'Cluster'}]))
    status, created = await http.post('/api/v1/namespaces/tenant/pods', pod('p1', app='web'))
    assert status == 201 and created['metadata']['labels'] == {'app': 'web'}
    assert webhook.reviews == []
    # A matching object in a matching namespace: each selector alone decides.
    status, created = await http.post('/api/v1/namespaces/tenant/pods', pod('p2', **{'dask.org/component': 'worker'}))
    assert created['metadata']['labels']['governed'] == 'yes'
    assert [r['request']['name'] for r in webhook.reviews] == ['p2']


async def test_denied_request_shows_the_webhook_message(http: Http, kubeconfig: pathlib.Path,
                                                        webhook: Webhook, certs: dict[str, Any]) -> None:
    await configure(http, hook(webhook.url, certs['ca']))
    webhook.answer = lambda request: {'allowed': False, 'status': {'code': 403, 'reason': 'Forbidden',
                                                                   'message': 'pods need a policy'}}
    code, out, err = await kubectl(kubeconfig, 'create', '-f', '-', input=pod('p1'))
    assert code != 0
    assert 'admission webhook "pods.mutate.example.com" denied the request: pods need a policy' in err
    assert 'Forbidden' in err
    assert await http.gone(f'{PODS}/p1')
    webhook.answer = lambda request: {'allowed': False}
    status, err = await http.post(PODS, pod('p2'))
    assert status == 400 and err['message'] == \
        'admission webhook "pods.mutate.example.com" denied the request without explanation'


async def test_webhook_down(http: Http, certs: dict[str, Any]) -> None:
    port = closed_port()
    url = f'https://127.0.0.1:{port}/mutate'
    await configure(http, hook(url, certs['ca'], failurePolicy='Ignore'))
    started = time.monotonic()
    status, created = await http.post(PODS, pod('p1', app='web'))
    assert status == 201 and created['metadata']['labels'] == {'app': 'web'}
    assert time.monotonic() - started < 2

    await http.patch(f'{MWC}/pod-mutator', [{'op': 'replace', 'path': '/webhooks/0/failurePolicy', 'value': 'Fail'}],
                     headers={'Content-Type': 'application/json-patch+json'})
    status, err = await http.post(PODS, pod('p2'))
    assert status == 500 and err['reason'] == 'InternalError'
    assert err['message'] == (f'Internal error occurred: failed calling webhook "pods.mutate.example.com": failed to '
                              f'call webhook: Post "{url}?timeout=10s": dial tcp 127.0.0.1:{port}: connect: '
                              f'connection refused')
    assert await http.gone(f'{PODS}/p2')


async def test_bad_ca_bundle_is_a_call_failure(http: Http, kubeconfig: pathlib.Path,
                                               webhook: Webhook, certs: dict[str, Any]) -> None:
    await configure(http, hook(webhook.url, certs['foreign']))
    code, out, err = await kubectl(kubeconfig, 'create', '-f', '-', input=pod('p1'))
    assert code != 0 and 'Error from server (InternalError)' in err
    assert (f'failed calling webhook "pods.mutate.example.com": failed to call webhook: Post "{webhook.url}?timeout=10s": '
            f'tls: failed to verify certificate: x509: certificate signed by unknown authority') in err
    assert webhook.reviews == []  # no request went through
    await http.patch(f'{MWC}/pod-mutator', [{'op': 'replace', 'path': '/webhooks/0/clientConfig/caBundle',
                                             'value': base64.b64encode(b'not a certificate').decode()}],
                     headers={'Content-Type': 'application/json-patch+json'})
    status, err = await http.post(PODS, pod('p2'))
    assert status == 500 and 'could not get REST client' in err['message']
    # Without a caBundle the machine's roots apply: a private CA is not trusted either.
    await http.patch(f'{MWC}/pod-mutator', [{'op': 'remove', 'path': '/webhooks/0/clientConfig/caBundle'},
                                            {'op': 'add', 'path': '/webhooks/0/failurePolicy', 'value': 'Ignore'}],
                     headers={'Content-Type': 'application/json-patch+json'})
    status, created = await http.post(PODS, pod('p3', app='web'))
    assert status == 201 and created['metadata']['labels'] == {'app': 'web'}


async def test_timeout_honoured(http: Http, webhook: Webhook, certs: dict[str, Any]) -> None:
    async def slow(request: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(3)
        return add_label('late', 'yes')(request)
    webhook.answer = slow
    await configure(http, hook(webhook.url, certs['ca'], timeoutSeconds=1))
    started = time.monotonic()
    status, err = await http.post(PODS, pod('p1'))
    elapsed = time.monotonic() - started
    assert status == 500 and 0.9 < elapsed < 2.5
    assert err['message'].endswith(f'Post "{webhook.url}?timeout=1s": context deadline exceeded')
    assert webhook.reviews[0]['query'] == {'timeout': '1s'}
    await http.patch(f'{MWC}/pod-mutator', [{'op': 'replace', 'path': '/webhooks/0/failurePolicy', 'value': 'Ignore'}],
                     headers={'Content-Type': 'application/json-patch+json'})
    status, created = await http.post(PODS, pod('p2', app='web'))
    assert status == 201 and created['metadata']['labels'] == {'app': 'web'}


async def test_update_and_service_reference(http: Http, kubeconfig: pathlib.Path, certs: dict[str, Any]) -> None:
    """UPDATE rules see the old object; a Service reference is dialled at its clusterIP and
    port (no kube-proxy in process: the webhook listens on the Service's port itself)."""
    webhook = Webhook()
    runner = await serve_webhook(webhook, certs, host=SERVICE_IP)
    try:
        port = int(webhook.url.rsplit(':', 1)[1].split('/')[0])
        status, _ = await http.post('/api/v1/namespaces/default/services', {'metadata': {'name': 'hook'}, 'spec': {
            'clusterIP': SERVICE_IP, 'ports': [{'port': port, 'targetPort': 9443}]}})
        assert status == 201
        await configure(http, hook('', certs['ca'], clientConfig={
            'service': {'name': 'hook', 'namespace': 'default', 'port': port, 'path': '/mutate'},
            'caBundle': certs['ca']},
            rules=[{'operations': ['CREATE', 'UPDATE'], 'apiGroups': [''], 'apiVersions': ['v1'],
                    'resources': ['pods']}]))
        webhook.answer = add_label('seen', 'yes')
        assert (await http.post(PODS, pod('p1', app='web')))[0] == 201
        assert webhook.reviews[0]['host'] == f'hook.default.svc:{port}'
        code, out, err = await kubectl(kubeconfig, 'label', 'pod', 'p1', 'tier=front')
        assert code == 0, err
        update = webhook.reviews[1]['request']
        assert update['operation'] == 'UPDATE' and update['options']['kind'] == 'PatchOptions'
        assert update['oldObject']['metadata']['labels'] == {'app': 'web', 'seen': 'yes'}
        assert update['object']['metadata']['labels']['tier'] == 'front'
        # /status is a subresource: "pods" alone does not match it.
        assert (await http.patch(f'{PODS}/p1/status', {'status': {'phase': 'Running'}}))[0] == 200
        assert len(webhook.reviews) == 2
    finally:
        await runner.cleanup()
    # The Service gone: a call failure.
    await http.delete('/api/v1/namespaces/default/services/hook')
    status, err = await http.post(PODS, pod('p2'))
    assert status == 500 and err['message'].endswith(f'Post "https://hook.default.svc:{port}/mutate?timeout=10s": '
                                                     'service "hook" not found')
