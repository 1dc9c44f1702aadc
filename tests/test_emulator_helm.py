"""
The real Helm 4 binary against the emulated API server, and the API semantics it needs:
protobuf request bodies (its release Secrets), watch-list watches (``sendInitialEvents``
and the bookmark ending the initial events: its waiters), strategic merge patches with
``$setElementOrder`` (its three-way merge on upgrade).

The chart is written by the test: a Deployment, a Service, a ConfigMap, a Secret whose
value a ``lookup`` keeps across upgrades, a ServiceAccount, a ClusterRole and its
binding, a custom resource of a CRD in ``crds/``, pre-install hooks with weights and
delete policies, and a test Pod. Helm installs with ``--server-side=false``: its default
is server-side apply, which the emulator does not serve (415).
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import yaml

from dmo_devstack.apiserver import ApiServer, write_kubeconfig
from dmo_devstack.emulator.patches import apply_patch, strategic_merge_patch
from dmo_devstack.emulator.protobuf import decode_body
from dmo_devstack.helm import helm_binary
from test_emulator import CONFIGMAPS, Http, holds, wait_for

PROTOBUF = {'Content-Type': 'application/vnd.kubernetes.protobuf'}
NS = 'shop'
RELEASE = 'r1'

# ---------------------------------------------------------------- the chart

CHART = {
    'Chart.yaml': 'apiVersion: v2\nname: probe\nversion: 0.1.0\nappVersion: "1.0"\n',
    'values.yaml': 'replicas: 1\ngreeting: hello\nextra: true\n',
    'crds/gadgets.yaml': """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: gadgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {plural: gadgets, singular: gadget, kind: Gadget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer}
              color: {type: string}
""",
    'templates/app.yaml': """
apiVersion: v1
kind: ServiceAccount
metadata: {name: {{ .Release.Name }}-sa}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: {{ .Release.Name }}-config}
data:
  greeting: {{ .Values.greeting | quote }}
---
{{- $old := lookup "v1" "Secret" .Release.Namespace (printf "%s-secret" .Release.Name) }}
apiVersion: v1
kind: Secret
metadata: {name: {{ .Release.Name }}-secret}
type: Opaque
data:
  password: {{ if $old }}{{ index $old.data "password" }}{{ else }}{{ randAlphaNum 16 | b64enc }}{{ end }}
---
apiVersion: v1
kind: Service
metadata: {name: {{ .Release.Name }}-svc}
spec:
  selector: {app: {{ .Release.Name }}}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: {{ .Release.Name }}-app}
spec:
  replicas: {{ .Values.replicas }}
  selector: {matchLabels: {app: {{ .Release.Name }}}}
  template:
    metadata: {labels: {app: {{ .Release.Name }}}}
    spec:
      serviceAccountName: {{ .Release.Name }}-sa
      containers:
      - name: app
        image: busybox:1.36
        args: [sleep, "3600"]
        env:
        {{- if ne .Values.greeting "hello" }}
        - {name: FIRST, value: "1"}
        {{- end }}
        - {name: GREETING, value: {{ .Values.greeting | quote }}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: {{ .Release.Name }}-reader}
rules: [{apiGroups: [""], resources: [pods], verbs: [get, list]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: {{ .Release.Name }}-reader}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {{ .Release.Name }}-reader}
subjects: [{kind: ServiceAccount, name: {{ .Release.Name }}-sa, namespace: {{ .Release.Namespace }}}]
---
apiVersion: example.com/v1
kind: Gadget
metadata: {name: {{ .Release.Name }}-gadget}
spec: {size: {{ .Values.replicas }}, color: {{ .Values.greeting }}}
""",
    'templates/extra.yaml': """
{{- if .Values.extra }}
apiVersion: v1
kind: ConfigMap
metadata: {name: {{ .Release.Name }}-extra}
data: {a: b}
{{- end }}
""",
    'templates/hooks.yaml': """
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-hook-late
  annotations:
    helm.sh/hook: pre-install,pre-upgrade
    helm.sh/hook-weight: "5"
    helm.sh/hook-delete-policy: before-hook-creation
data: {weight: "5"}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-hook-early
  annotations:
    helm.sh/hook: pre-install
    helm.sh/hook-weight: "-5"
    helm.sh/hook-delete-policy: hook-succeeded
data: {weight: "-5"}
---
apiVersion: v1
kind: Pod
metadata:
  name: {{ .Release.Name }}-test
  annotations:
    helm.sh/hook: test
    helm.sh/hook-delete-policy: before-hook-creation
spec:
  restartPolicy: Never
  containers: [{name: check, image: busybox:1.36, args: ["true"]}]
""",
}

#: What the release's templates make (hooks and the CRD apart), as API paths.
RELEASE_OBJECTS = [
    f'/api/v1/namespaces/{NS}/serviceaccounts/{RELEASE}-sa',
    f'/api/v1/namespaces/{NS}/configmaps/{RELEASE}-config',
    f'/api/v1/namespaces/{NS}/configmaps/{RELEASE}-extra',
    f'/api/v1/namespaces/{NS}/secrets/{RELEASE}-secret',
    f'/api/v1/namespaces/{NS}/services/{RELEASE}-svc',
    f'/apis/apps/v1/namespaces/{NS}/deployments/{RELEASE}-app',
    f'/apis/rbac.authorization.k8s.io/v1/clusterroles/{RELEASE}-reader',
    f'/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{RELEASE}-reader',
    f'/apis/example.com/v1/namespaces/{NS}/gadgets/{RELEASE}-gadget',
]
CONFIG = f'/api/v1/namespaces/{NS}/configmaps/{RELEASE}-config'
EXTRA = f'/api/v1/namespaces/{NS}/configmaps/{RELEASE}-extra'
SECRET = f'/api/v1/namespaces/{NS}/secrets/{RELEASE}-secret'
APP = f'/apis/apps/v1/namespaces/{NS}/deployments/{RELEASE}-app'
GADGET = f'/apis/example.com/v1/namespaces/{NS}/gadgets/{RELEASE}-gadget'
TEST_POD = f'/api/v1/namespaces/{NS}/pods/{RELEASE}-test'
SECRETS = f'/api/v1/namespaces/{NS}/secrets'


def write_chart(root: pathlib.Path) -> pathlib.Path:
    for name, text in CHART.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text.lstrip())
    return root


# ---------------------------------------------------------------- running helm


class Helm:
    """The real helm binary, against one kubeconfig, with homes of its own."""

    def __init__(self, kubeconfig: pathlib.Path, home: pathlib.Path) -> None:
        self.binary = str(helm_binary())
        self.env = {**os.environ, 'KUBECONFIG': str(kubeconfig), 'KUBECACHEDIR': str(home / 'kube-cache'),
                    'HELM_CACHE_HOME': str(home / 'cache'), 'HELM_CONFIG_HOME': str(home / 'config'),
                    'HELM_DATA_HOME': str(home / 'data')}
        self.env.pop('HELM_DRIVER', None)

    async def start(self, *args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(self.binary, *args, env=self.env, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)

    @staticmethod
    async def finish(proc: asyncio.subprocess.Process, check: bool = True) -> tuple[int, str, str]:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode is not None
        if check:
            assert proc.returncode == 0, err.decode()
        return proc.returncode, out.decode(), err.decode()

    async def __call__(self, *args: str, check: bool = True) -> str:
        return (await self.finish(await self.start(*args), check))[1]


@pytest.fixture
async def server() -> AsyncIterator[ApiServer]:
    async with ApiServer() as srv:
        yield srv
        assert srv.emulator.errors == []  # no request hit an emulator bug


@pytest.fixture
async def http(server: ApiServer) -> AsyncIterator[Http]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        yield Http(server.url, session)


@pytest.fixture
def helm(server: ApiServer, tmp_path: pathlib.Path) -> Helm:
    kubeconfig = tmp_path / 'kubeconfig'
    write_kubeconfig(kubeconfig, server.url)
    return Helm(kubeconfig, tmp_path / 'helm')


def requests(server: ApiServer, method: str, path_prefix: str) -> list[Any]:
    """The requests the emulator has seen, by method and path prefix (oldest first)."""
    return [r for r in server.emulator._requests
            if r.method.value == method and r.url.path.startswith(path_prefix)]


async def release_secrets(http: Http) -> dict[str, dict[str, Any]]:
    status, listed = await http.get(SECRETS, labelSelector=f'owner=helm,name={RELEASE}')
    assert status == 200
    return {s['metadata']['name']: s for s in listed['items']}


async def live(http: Http, path: str) -> dict[str, Any]:
    status, obj = await http.get(path)
    assert status == 200, obj
    return obj


# ---------------------------------------------------------------- the release's life


async def test_helm_release_lifecycle(server: ApiServer, http: Http, helm: Helm, tmp_path: pathlib.Path) -> None:
    chart = str(write_chart(tmp_path / 'chart'))

    # install: the CRD first, hooks by weight, the release stored as protobuf Secrets.
    await helm('install', RELEASE, chart, '-n', NS, '--create-namespace', '--server-side=false')
    for path in RELEASE_OBJECTS:
        obj = await live(http, path)
        assert obj['metadata']['labels']['app.kubernetes.io/managed-by'] == 'Helm'
        assert obj['metadata']['annotations']['meta.helm.sh/release-name'] == RELEASE
    assert (await live(http, '/apis/apiextensions.k8s.io/v1/customresourcedefinitions/gadgets.example.com'))
    hook_posts = [json.loads(r.body)['metadata']['name']
                  for r in requests(server, 'POST', f'/api/v1/namespaces/{NS}/configmaps')
                  if 'hook' in json.loads(r.body)['metadata']['name']]
    assert hook_posts == [f'{RELEASE}-hook-early', f'{RELEASE}-hook-late']  # by weight, not by file order
    assert (await http.get(f'/api/v1/namespaces/{NS}/configmaps/{RELEASE}-hook-early'))[0] == 404  # hook-succeeded
    late_uid = (await live(http, f'/api/v1/namespaces/{NS}/configmaps/{RELEASE}-hook-late'))['metadata']['uid']
    stored = await release_secrets(http)
    assert list(stored) == [f'sh.helm.release.v1.{RELEASE}.v1']
    assert stored[f'sh.helm.release.v1.{RELEASE}.v1']['type'] == 'helm.sh/release.v1'
    assert stored[f'sh.helm.release.v1.{RELEASE}.v1']['metadata']['labels']['status'] == 'deployed'
    # The release Secret came as protobuf (created, then replaced), and what is stored
    # is what the last body said.
    posted = requests(server, 'POST', SECRETS)
    assert posted[0].headers['Content-Type'] == PROTOBUF['Content-Type'] and posted[0].body.startswith(b'k8s\x00')
    assert decode_body(posted[0].body)['metadata']['labels']['status'] == 'pending-install'
    replaced = decode_body(requests(server, 'PUT', f'{SECRETS}/sh.helm.release.v1.{RELEASE}.v1')[-1].body)
    assert replaced['data'] == stored[f'sh.helm.release.v1.{RELEASE}.v1']['data']
    assert replaced['metadata']['labels'] == stored[f'sh.helm.release.v1.{RELEASE}.v1']['metadata']['labels']
    password = (await live(http, SECRET))['data']['password']

    # upgrade: a three-way strategic merge for built-ins, a merge patch for the custom
    # resource; a template gone is deleted; lookup keeps the generated password.
    await helm('upgrade', RELEASE, chart, '-n', NS, '--set', 'greeting=bye,extra=false,replicas=2')
    assert (await live(http, CONFIG))['data'] == {'greeting': 'bye'}
    app = await live(http, APP)
    assert app['spec']['replicas'] == 2 and app['metadata']['generation'] == 2
    # $setElementOrder: the new variable goes first, where the template has it.
    assert app['spec']['template']['spec']['containers'][0]['env'] == [
        {'name': 'FIRST', 'value': '1'}, {'name': 'GREETING', 'value': 'bye'}]
    assert (await live(http, GADGET))['spec'] == {'size': 2, 'color': 'bye'}
    assert (await http.get(EXTRA))[0] == 404
    assert (await live(http, SECRET))['data']['password'] == password
    patches = {r.url.path: r.headers['Content-Type'] for r in requests(server, 'PATCH', '/')}
    assert patches[APP] == 'application/strategic-merge-patch+json'
    assert patches[GADGET] == 'application/merge-patch+json'
    new_late = await live(http, f'/api/v1/namespaces/{NS}/configmaps/{RELEASE}-hook-late')
    assert new_late['metadata']['uid'] != late_uid  # before-hook-creation: deleted, then made again
    statuses = {n: s['metadata']['labels']['status'] for n, s in (await release_secrets(http)).items()}
    assert statuses == {f'sh.helm.release.v1.{RELEASE}.v1': 'superseded', f'sh.helm.release.v1.{RELEASE}.v2': 'deployed'}

    # rollback to the first revision: a third one, with the first one's objects.
    await helm('rollback', RELEASE, '1', '-n', NS)
    assert (await live(http, CONFIG))['data'] == {'greeting': 'hello'}
    assert (await live(http, EXTRA))['data'] == {'a': 'b'}
    app = await live(http, APP)
    assert app['spec']['replicas'] == 1
    assert app['spec']['template']['spec']['containers'][0]['env'] == [{'name': 'GREETING', 'value': 'hello'}]
    assert (await live(http, SECRET))['data']['password'] == password

    listed = json.loads(await helm('list', '-n', NS, '-o', 'json'))
    assert [(r['name'], r['revision'], r['status']) for r in listed] == [(RELEASE, '3', 'deployed')]
    status = json.loads(await helm('status', RELEASE, '-n', NS, '-o', 'json'))
    assert status['version'] == 3 and status['info']['description'] == 'Rollback to 1'
    manifest = list(yaml.safe_load_all(await helm('get', 'manifest', RELEASE, '-n', NS)))
    assert sorted(d['kind'] for d in manifest if d) == sorted([
        'ServiceAccount', 'ConfigMap', 'ConfigMap', 'Secret', 'Service', 'Deployment', 'ClusterRole',
        'ClusterRoleBinding', 'Gadget'])
    history = json.loads(await helm('history', RELEASE, '-n', NS, '-o', 'json'))
    assert [h['status'] for h in history] == ['superseded', 'superseded', 'deployed']

    # helm test: the test Pod is made, and helm waits (watching) for its phase.
    test = await helm.start('test', RELEASE, '-n', NS)

    async def pod_made() -> bool:
        return (await http.get(TEST_POD))[0] == 200
    await wait_for(pod_made, timeout=20)
    assert test.returncode is None  # waiting for the Pod (no kubelet here: the test plays it)
    status_code, _ = await http.patch(f'{TEST_POD}/status', {'status': {'phase': 'Succeeded'}})
    assert status_code == 200
    _, out, _ = await helm.finish(test)
    assert 'Phase:          Succeeded' in out

    # --wait (kstatus, on watches): helm waits until the Deployment is current.
    upgrade = await helm.start('upgrade', RELEASE, chart, '-n', NS, '--set', 'greeting=wait', '--wait',
                               '--timeout', '30s')
    await wait_for(lambda: holds(any(r.params.get('watch') == 'true'
                                     for r in requests(server, 'GET', f'/apis/apps/v1/namespaces/{NS}/deployments'))),
                   timeout=20)
    assert upgrade.returncode is None
    pending = (await release_secrets(http))[f'sh.helm.release.v1.{RELEASE}.v4']
    assert pending['metadata']['labels']['status'] == 'pending-upgrade'
    app = await live(http, APP)
    status_code, _ = await http.patch(f'{APP}/status', {'status': {
        'observedGeneration': app['metadata']['generation'], 'replicas': 1, 'updatedReplicas': 1,
        'readyReplicas': 1, 'availableReplicas': 1, 'conditions': [
            {'type': 'Available', 'status': 'True', 'reason': 'MinimumReplicasAvailable'},
            {'type': 'Progressing', 'status': 'True', 'reason': 'NewReplicaSetAvailable'}]}})
    assert status_code == 200
    await helm.finish(upgrade)
    assert json.loads(await helm('status', RELEASE, '-n', NS, '-o', 'json'))['version'] == 4

    # uninstall: every object of the release deleted (background propagation), and its
    # history; the CRD stays, as do hooks without a delete policy that fires (Helm's way).
    await helm('uninstall', RELEASE, '-n', NS)
    for path in RELEASE_OBJECTS:
        assert (await http.get(path))[0] == 404, path
    assert await release_secrets(http) == {}
    deletes = {r.url.path: r for r in requests(server, 'DELETE', '/')}
    assert json.loads(deletes[APP].body) == {'propagationPolicy': 'Background'}
    release_delete = deletes[f'{SECRETS}/sh.helm.release.v1.{RELEASE}.v1']
    assert decode_body(release_delete.body) == {'kind': 'DeleteOptions', 'apiVersion': 'v1'}
    assert (await http.get('/apis/apiextensions.k8s.io/v1/customresourcedefinitions/gadgets.example.com'))[0] == 200
    assert (await http.get(f'/api/v1/namespaces/{NS}/configmaps/{RELEASE}-hook-late'))[0] == 200
    assert (await http.get(TEST_POD))[0] == 200


async def test_helm_default_server_side_apply_is_refused(server: ApiServer, helm: Helm, tmp_path: pathlib.Path) -> None:
    """Helm 4 installs with server-side apply by default: the emulator answers 415 and
    helm stops at its first object (the CRD); nothing is stored."""
    chart = str(write_chart(tmp_path / 'chart'))
    code, _, err = await helm.finish(await helm.start('install', RELEASE, chart, '-n', 'default'), check=False)
    assert code != 0 and 'server-side apply not available on the server' in err
    applies = requests(server, 'PATCH', '/')
    assert [r.headers['Content-Type'] for r in applies] == ['application/apply-patch+yaml']
    assert not requests(server, 'POST', '/api/v1/namespaces/default/secrets')


# ---------------------------------------------------------------- protobuf bodies

# Captured from kubectl 1.32 (create namespace / secret generic --type / configmap
# --from-literal --from-file of 3 non-UTF-8 bytes) and Helm 4.1 (a release's DeleteOptions).
KUBECTL_NAMESPACE = (b'k8s\x00\n\x0f\n\x02v1\x12\tNamespace\x12\x1a\n\x12\n\x02pb\x12\x00\x1a\x00"\x00*\x002\x008\x00'
                     b'B\x00\x12\x00\x1a\x02\n\x00\x1a\x00"\x00')
KUBECTL_SECRET = (b'k8s\x00\n\x0c\n\x02v1\x12\x06Secret\x127\n\x14\n\x02s1\x12\x00\x1a\x02pb"\x00*\x002\x008\x00B\x00'
                  b'\x12\x0b\n\x04user\x12\x03ada\x1a\x12example.com/custom\x1a\x00"\x00')
KUBECTL_CONFIGMAP = (b'k8s\x00\n\x0f\n\x02v1\x12\tConfigMap\x12+\n\x14\n\x02c1\x12\x00\x1a\x02pb"\x00*\x002\x008\x00'
                     b'B\x00\x12\x06\n\x01k\x12\x01v\x1a\x0b\n\x04blob\x12\x03\xff\x00\x01\x1a\x00"\x00')
HELM_DELETE_OPTIONS = b'k8s\x00\n\x13\n\x02v1\x12\rDeleteOptions\x12\x00\x1a\x00"\x00'


def test_protobuf_captured_bodies() -> None:
    assert decode_body(KUBECTL_NAMESPACE) == {'kind': 'Namespace', 'apiVersion': 'v1', 'metadata': {'name': 'pb'},
                                              'spec': {}, 'status': {}}
    assert decode_body(KUBECTL_SECRET) == {'kind': 'Secret', 'apiVersion': 'v1',
                                           'metadata': {'name': 's1', 'namespace': 'pb'},
                                           'data': {'user': base64.b64encode(b'ada').decode()},
                                           'type': 'example.com/custom'}
    assert decode_body(KUBECTL_CONFIGMAP) == {'kind': 'ConfigMap', 'apiVersion': 'v1',
                                              'metadata': {'name': 'c1', 'namespace': 'pb'}, 'data': {'k': 'v'},
                                              'binaryData': {'blob': base64.b64encode(b'\xff\x00\x01').decode()}}
    assert decode_body(HELM_DELETE_OPTIONS) == {'kind': 'DeleteOptions', 'apiVersion': 'v1'}


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = b''
    while True:
        out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out


def _f(number: int, value: bytes | int | str) -> bytes:
    """One field on the wire: varints for ints, length-delimited for the rest."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    raw = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(raw)) + raw


def _envelope(api_version: str, kind: str, raw: bytes) -> bytes:
    return b'k8s\x00' + _f(1, _f(1, api_version) + _f(2, kind)) + _f(2, raw) + _f(3, '') + _f(4, '')


def test_protobuf_object_meta_fields() -> None:
    """Every ObjectMeta field a client may send, by its generated.proto number; pointer
    fields keep their zero values, others drop them; unknown fields are skipped."""
    owner = _f(1, 'Deployment') + _f(3, 'app') + _f(4, 'u-1') + _f(5, 'apps/v1') + _f(6, 1) + _f(7, 0)
    managed = _f(1, 'helm') + _f(2, 'Update') + _f(3, 'v1') + _f(4, _f(1, 1_700_000_000)) + _f(6, 'FieldsV1') \
        + _f(7, _f(1, '{"f:data":{}}'))
    meta = (_f(1, 'c2') + _f(2, 'c-') + _f(3, 'ns') + _f(5, 'uid-9') + _f(6, '42') + _f(7, 3)
            + _f(8, _f(1, 1_700_000_000) + _f(2, 5)) + _f(9, b'') + _f(10, 0)
            + _f(11, _f(1, 'a') + _f(2, '1')) + _f(11, _f(1, 'empty') + _f(2, ''))
            + _f(12, _f(1, 'note') + _f(2, 'x')) + _f(13, owner) + _f(14, 'f1') + _f(14, 'f2')
            + _f(17, managed) + _f(99, 'future field'))
    body = _envelope('v1', 'ConfigMap', _f(1, meta) + _f(2, _f(1, 'k') + _f(2, 'v')) + _f(4, 0))
    assert decode_body(body) == {'kind': 'ConfigMap', 'apiVersion': 'v1', 'metadata': {
        'name': 'c2', 'generateName': 'c-', 'namespace': 'ns', 'uid': 'uid-9', 'resourceVersion': '42',
        'generation': 3, 'creationTimestamp': '2023-11-14T22:13:20Z', 'deletionGracePeriodSeconds': 0,
        'labels': {'a': '1', 'empty': ''}, 'annotations': {'note': 'x'},
        'ownerReferences': [{'kind': 'Deployment', 'name': 'app', 'uid': 'u-1', 'apiVersion': 'apps/v1',
                             'controller': True, 'blockOwnerDeletion': False}],
        'finalizers': ['f1', 'f2'],
        'managedFields': [{'manager': 'helm', 'operation': 'Update', 'apiVersion': 'v1',
                           'time': '2023-11-14T22:13:20Z', 'fieldsType': 'FieldsV1', 'fieldsV1': {'f:data': {}}}]},
        'data': {'k': 'v'}, 'immutable': False}
    secret = _envelope('v1', 'Secret', _f(1, _f(1, 's')) + _f(4, _f(1, 'token') + _f(2, 'plain')) + _f(5, 1))
    assert decode_body(secret) == {'kind': 'Secret', 'apiVersion': 'v1', 'metadata': {'name': 's'},
                                   'stringData': {'token': 'plain'}, 'immutable': True}
    options = _envelope('v1', 'DeleteOptions', _f(1, 0) + _f(2, _f(1, 'u') + _f(2, '7')) + _f(4, 'Foreground')
                        + _f(5, 'All'))
    assert decode_body(options) == {'kind': 'DeleteOptions', 'apiVersion': 'v1', 'gracePeriodSeconds': 0,
                                    'preconditions': {'uid': 'u', 'resourceVersion': '7'},
                                    'propagationPolicy': 'Foreground', 'dryRun': ['All']}


async def test_protobuf_requests(http: Http) -> None:
    """Over HTTP: created from protobuf with the server's semantics (stringData into
    data, type defaulted); other kinds' protobuf is a 415, a non-protobuf body a 400."""
    async def send(method: str, path: str, body: bytes) -> tuple[int, Any]:
        async with http.session.request(method, http.url + path, data=body, headers=PROTOBUF) as resp:
            return resp.status, await resp.json(content_type=None)

    meta = _f(1, 'tok') + _f(11, _f(1, 'app') + _f(2, 'web'))
    status, created = await send('POST', '/api/v1/namespaces/default/secrets',
                                 _envelope('v1', 'Secret', _f(1, meta) + _f(4, _f(1, 'key') + _f(2, 'plain'))))
    assert status == 201, created
    assert created['type'] == 'Opaque' and created['data'] == {'key': base64.b64encode(b'plain').decode()}
    assert 'stringData' not in created and created['metadata']['labels'] == {'app': 'web'}
    assert created['metadata']['uid'] and created['metadata']['namespace'] == 'default'
    status, listed = await http.get('/api/v1/namespaces/default/secrets', labelSelector='app=web')
    assert [s['metadata']['name'] for s in listed['items']] == ['tok']
    # An unconditional PUT (no resourceVersion), as Helm's storage does.
    status, replaced = await send('PUT', '/api/v1/namespaces/default/secrets/tok',
                                  _envelope('v1', 'Secret', _f(1, _f(1, 'tok')) + _f(2, _f(1, 'k2') + _f(2, b'\x00'))))
    assert status == 200 and replaced['data'] == {'k2': 'AA=='} and 'labels' not in replaced['metadata']
    status, _ = await send('DELETE', '/api/v1/namespaces/default/secrets/tok', _envelope('v1', 'DeleteOptions', b''))
    assert status == 200 and (await http.get('/api/v1/namespaces/default/secrets/tok'))[0] == 404

    status, error = await send('POST', '/api/v1/namespaces/default/pods', _envelope('v1', 'Pod', _f(1, _f(1, 'p'))))
    assert (status, error['reason']) == (415, 'UnsupportedMediaType')
    assert error['message'].startswith('the body of the request was in an unknown format')
    status, error = await send('POST', CONFIGMAPS, b'{"kind": "ConfigMap"}')
    assert (status, error['reason']) == (400, 'BadRequest')
    assert error['message'] == ('provided data does not appear to be a protobuf message, expected prefix '
                                '[107 56 115 0]')
    status, error = await send('POST', CONFIGMAPS, _envelope('v1', 'ConfigMap', b'\x0a\x05ab'))  # truncated
    assert (status, error['reason']) == (400, 'BadRequest') and 'cannot be handled as a ConfigMap' in error['message']


# ---------------------------------------------------------------- watch-list and patches


async def test_watch_list_initial_events_end_bookmark(http: Http) -> None:
    """sendInitialEvents=true: the current objects, then a bookmark annotated
    k8s.io/initial-events-end, then later events; invalid combinations are 422."""
    assert (await http.post(CONFIGMAPS, {'metadata': {'name': 'one'}, 'data': {'a': '1'}}))[0] == 201
    events: list[dict[str, Any]] = []
    watch = asyncio.create_task(http.watch(CONFIGMAPS, events, sendInitialEvents='true',
                                           resourceVersionMatch='NotOlderThan', allowWatchBookmarks='true',
                                           timeoutSeconds=1))
    await wait_for(lambda: holds(len(events) >= 2))
    assert (await http.post(CONFIGMAPS, {'metadata': {'name': 'two'}}))[0] == 201
    await asyncio.wait_for(watch, timeout=10)
    kinds = [(e['type'], e['object']['metadata'].get('name')) for e in events]
    assert kinds[:3] == [('ADDED', 'one'), ('BOOKMARK', None), ('ADDED', 'two')]
    bookmark = events[1]['object']
    assert bookmark['metadata']['annotations'] == {'k8s.io/initial-events-end': 'true'}
    assert int(bookmark['metadata']['resourceVersion']) >= int(events[0]['object']['metadata']['resourceVersion'])

    status, error = await http.get(CONFIGMAPS, watch='true', sendInitialEvents='true')
    assert status == 422 and error['message'] == (
        'ListOptions.meta.k8s.io "" is invalid: resourceVersionMatch: Forbidden: sendInitialEvents requires '
        'setting resourceVersionMatch to NotOlderThan')
    status, error = await http.get(CONFIGMAPS, sendInitialEvents='true')
    assert status == 422 and error['message'].endswith('sendInitialEvents: Forbidden: sendInitialEvents is '
                                                       'forbidden for list')
    # sendInitialEvents=false from "now": only later events.
    later: list[dict[str, Any]] = []
    watch = asyncio.create_task(http.watch(CONFIGMAPS, later, sendInitialEvents='false',
                                           resourceVersionMatch='NotOlderThan', timeoutSeconds=1))
    await asyncio.wait_for(watch, timeout=10)
    assert later == []


def test_strategic_merge_set_element_order() -> None:
    """$setElementOrder (apimachinery's normalizeElementOrder): the patch's order, with
    server-only items kept where they were relative to the others."""
    live = {'env': [{'name': 'A', 'value': '1'}, {'name': 'S', 'value': 's'}, {'name': 'C', 'value': '3'}]}
    patched = strategic_merge_patch(live, {'$setElementOrder/env': [{'name': 'B'}, {'name': 'A'}, {'name': 'C'}],
                                           'env': [{'name': 'B', 'value': '2'}]})
    assert [e['name'] for e in patched['env']] == ['B', 'A', 'S', 'C']
    reordered = strategic_merge_patch(live, {'$setElementOrder/env': [{'name': 'C'}, {'name': 'A'}]})
    assert [e['name'] for e in reordered['env']] == ['S', 'C', 'A']
    assert strategic_merge_patch({'finalizers': ['a', 'b']}, {'$setElementOrder/finalizers': ['c', 'a', 'b'],
                                                              'finalizers': ['c']}) == {'finalizers': ['c', 'a', 'b']}


async def test_secret_and_configmap_update_rules(http: Http) -> None:
    """A Secret's type never changes; ``immutable: true`` fixes data and the flag."""
    secrets = '/api/v1/namespaces/default/secrets'
    assert (await http.post(secrets, {'metadata': {'name': 's'}, 'stringData': {'a': 'x'}}))[0] == 201
    status, error = await http.put(f'{secrets}/s', {'metadata': {'name': 's'}, 'type': 'example.com/other'})
    assert status == 422 and error['message'] == (
        'Secret "s" is invalid: type: Invalid value: "example.com/other": field is immutable')
    cm = {'metadata': {'name': 'frozen'}, 'data': {'a': '1'}, 'immutable': True}
    assert (await http.post(CONFIGMAPS, cm))[0] == 201
    status, error = await http.patch(f'{CONFIGMAPS}/frozen', {'data': {'a': '2'}})
    assert status == 422 and error['message'] == (
        'ConfigMap "frozen" is invalid: data: Forbidden: field is immutable when `immutable` is set')
    status, error = await http.patch(f'{CONFIGMAPS}/frozen', {'immutable': False})
    assert status == 422 and 'immutable: Forbidden: field is immutable when `immutable` is set' in error['message']
    status, _ = await http.patch(f'{CONFIGMAPS}/frozen', {'metadata': {'labels': {'ok': 'yes'}}})
    assert status == 200  # metadata still changes


def test_strategic_merge_keys_come_from_the_schema() -> None:
    """List strategies as the kind's schema (its Go struct tags) says: webhooks merge by
    name (a patch of one field keeps the others), finalizers are a set, rules replace."""
    webhooks = {'apiVersion': 'admissionregistration.k8s.io/v1', 'kind': 'MutatingWebhookConfiguration',
                'metadata': {'name': 'm', 'finalizers': ['a']}, 'webhooks': [
                    {'name': 'w1', 'sideEffects': 'None', 'clientConfig': {'url': 'https://old'},
                     'rules': [{'operations': ['CREATE'], 'resources': ['pods']}]},
                    {'name': 'w2', 'sideEffects': 'None'}]}
    patched = apply_patch(webhooks, {'metadata': {'finalizers': ['b']}, 'webhooks': [
        {'name': 'w1', 'clientConfig': {'url': 'https://new'}, 'rules': [{'operations': ['UPDATE']}]}]},
        'application/strategic-merge-patch+json', custom=False)
    assert patched['metadata']['finalizers'] == ['a', 'b']
    assert patched['webhooks'] == [
        {'name': 'w1', 'sideEffects': 'None', 'clientConfig': {'url': 'https://new'}, 'rules': [{'operations': ['UPDATE']}]},
        {'name': 'w2', 'sideEffects': 'None'}]
