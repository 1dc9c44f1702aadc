"""
Service accounts, their tokens, authentication, RBAC and the audit log of the
emulated API server, over real HTTP (and kubectl with a token kubeconfig), checked
against what a real kube-apiserver answers.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import pathlib
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import aiohttp.web
import yaml

from test_emulator import KUBECTL, Http, http, server, wait_for
from dmo_devstack.apiserver import ApiServer, write_kubeconfig
from dmo_devstack.emulator.authn import UserInfo
from dmo_devstack.emulator.rbac import (
    RequestAttributes, attributes_of_audit_event, request_attributes, rule_allows)
from dask_memory_operator.webhook.certs import write_webhook_certs

__all__ = ['http', 'server']  # fixtures used here
SA = '/api/v1/namespaces/{ns}/serviceaccounts'
PODS = '/api/v1/namespaces/default/pods'


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split('.')[1]
    return json.loads(base64.urlsafe_b64decode(payload + '=' * (-len(payload) % 4)))


async def token_for(http: Http, name: str, ns: str = 'default', **spec: Any) -> tuple[int, Any]:
    return await http.post(f'{SA.format(ns=ns)}/{name}/token', {
        'apiVersion': 'authentication.k8s.io/v1', 'kind': 'TokenRequest', 'spec': spec})


async def test_every_namespace_gets_a_default_service_account(http: Http) -> None:
    for ns in ('default', 'kube-system', 'kube-public', 'kube-node-lease'):
        assert (await http.get(f'{SA.format(ns=ns)}/default'))[0] == 200
    assert (await http.post('/api/v1/namespaces', {'metadata': {'name': 'team'}}))[0] == 201
    status, sa = await http.get(f'{SA.format(ns="team")}/default')
    assert status == 200 and sa['kind'] == 'ServiceAccount'
    # The serviceaccount controller puts it back when deleted (another uid).
    assert (await http.delete(f'{SA.format(ns="team")}/default'))[0] == 200

    async def recreated() -> bool:
        status, again = await http.get(f'{SA.format(ns="team")}/default')
        return status == 200 and again['metadata']['uid'] != sa['metadata']['uid']
    await wait_for(recreated)


async def test_token_request(server: ApiServer, http: Http) -> None:
    status, sa = await http.post(SA.format(ns='default'), {'metadata': {'name': 'op'}})
    assert status == 201
    status, review = await token_for(http, 'op')
    assert status == 201 and review['kind'] == 'TokenRequest'
    assert review['spec']['expirationSeconds'] == 3600
    token = review['status']['token']
    claims = claims_of(token)
    assert claims['sub'] == 'system:serviceaccount:default:op'
    assert claims['iss'] == 'https://kubernetes.default.svc.cluster.local'
    assert claims['aud'] == ['https://kubernetes.default.svc.cluster.local']
    assert claims['exp'] - claims['iat'] == 3600 and claims['nbf'] == claims['iat']
    assert claims['kubernetes.io'] == {'namespace': 'default',
                                       'serviceaccount': {'name': 'op', 'uid': sa['metadata']['uid']}}
    identity = server.emulator.validate_service_account_token(token)
    assert identity is not None and identity.username == 'system:serviceaccount:default:op'

    # A forged one (signature of another token) is not valid; nor one for another audience.
    header, payload, signature = token.split('.')
    other = claims_of(token) | {'sub': 'system:serviceaccount:kube-system:default'}
    forged_payload = base64.urlsafe_b64encode(json.dumps(other).encode()).rstrip(b'=').decode()
    assert server.emulator.validate_service_account_token(f'{header}.{forged_payload}.{signature}') is None
    status, review = await token_for(http, 'op', audiences=['vault'], expirationSeconds=600)
    assert status == 201 and claims_of(review['status']['token'])['aud'] == ['vault']
    assert server.emulator.validate_service_account_token(review['status']['token']) is None

    # Deleted and recreated: another account, the old token is no longer valid.
    assert (await http.delete(f'{SA.format(ns="default")}/op'))[0] == 200
    assert server.emulator.validate_service_account_token(token) is None
    assert (await http.post(SA.format(ns='default'), {'metadata': {'name': 'op'}}))[0] == 201
    assert server.emulator.validate_service_account_token(token) is None


async def test_token_request_errors(http: Http) -> None:
    status, err = await token_for(http, 'missing')
    assert status == 404 and err['reason'] == 'NotFound'
    assert err['message'] == 'serviceaccounts "missing" not found'
    status, err = await token_for(http, 'default', expirationSeconds=599)
    assert status == 422 and err['message'] == ('TokenRequest.authentication.k8s.io "default" is invalid: '
                                                'spec.expirationSeconds: Invalid value: 599: may not specify a '
                                                'duration less than 10 minutes')
    status, err = await token_for(http, 'default', boundObjectRef={'kind': 'Pod', 'apiVersion': 'v1', 'name': 'p'})
    assert status == 404 and err['message'] == 'pods "p" not found'


async def test_token_bound_to_a_pod(server: ApiServer, http: Http) -> None:
    pod = {'metadata': {'name': 'p'}, 'spec': {'containers': [{'name': 'c', 'image': 'x'}]}}
    status, pod = await http.post(PODS, pod)
    assert status == 201
    ref = {'kind': 'Pod', 'apiVersion': 'v1', 'name': 'p'}
    status, review = await token_for(http, 'default', boundObjectRef=ref)
    assert status == 201 and review['spec']['boundObjectRef']['uid'] == pod['metadata']['uid']
    token = review['status']['token']
    assert claims_of(token)['kubernetes.io']['pod'] == {'name': 'p', 'uid': pod['metadata']['uid']}
    identity = server.emulator.validate_service_account_token(token)
    assert identity is not None and identity.pod_name == 'p'
    status, err = await token_for(http, 'default', boundObjectRef={**ref, 'uid': 'other'})
    assert status == 409 and err['reason'] == 'Conflict'

    assert (await http.delete(f'{PODS}/p', gracePeriodSeconds=0))[0] == 200
    assert server.emulator.validate_service_account_token(token) is None


async def test_discovery_lists_the_token_subresource(http: Http) -> None:
    status, resources = await http.get('/api/v1')
    token = next(r for r in resources['resources'] if r['name'] == 'serviceaccounts/token')
    assert token == {'name': 'serviceaccounts/token', 'singularName': '', 'namespaced': True,
                     'kind': 'TokenRequest', 'group': 'authentication.k8s.io', 'version': 'v1', 'verbs': ['create']}


# ---------------------------------------------------------------- authentication and RBAC

RBAC = '/apis/rbac.authorization.k8s.io/v1'
DEPLOYMENTS = '/apis/apps/v1/namespaces/default/deployments'


class AsToken(Http):
    """The JSON client, with a bearer token on every request."""

    def __init__(self, http: Http, token: str) -> None:
        super().__init__(http.url, http.session)
        self.token = token

    async def request(self, method: str, path: str, body: Any = None,
                      headers: dict[str, str] | None = None, **params: Any) -> tuple[int, Any, Any]:
        headers = {'Authorization': f'Bearer {self.token}', **(headers or {})}
        return await super().request(method, path, body, headers, **params)

    async def watch(self, path: str, events: list[dict[str, Any]], **params: Any) -> None:
        params = {'watch': 'true', **{k: str(v) for k, v in params.items()}}
        async with self.session.get(self.url + path, params=params,
                                    headers={'Authorization': f'Bearer {self.token}'}) as resp:
            assert resp.status == 200
            async for line in resp.content:
                if line.strip():
                    events.append(json.loads(line))

    async def status(self, path: str) -> int:
        """The status code of a GET whose answer may not be JSON (/healthz, /logs)."""
        async with self.session.get(self.url + path, headers={'Authorization': f'Bearer {self.token}'}) as resp:
            return resp.status


async def service_account(http: Http, name: str, ns: str = 'default') -> AsToken:
    """A new ServiceAccount and a client holding its token."""
    assert (await http.post(SA.format(ns=ns), {'metadata': {'name': name}}))[0] == 201
    status, review = await token_for(http, name, ns)
    assert status == 201
    return AsToken(http, review['status']['token'])


def user(name: str, ns: str = 'default') -> str:
    return f'system:serviceaccount:{ns}:{name}'


async def grant(http: Http, kind: str, name: str, rules: list[dict[str, Any]], subjects: list[dict[str, Any]],
                ns: str | None = None, role_kind: str | None = None) -> None:
    """A Role or ClusterRole with these rules and a binding of it (``kind``: RoleBinding or ClusterRoleBinding)."""
    role_kind = role_kind or ('Role' if kind == 'RoleBinding' else 'ClusterRole')
    scope = f'/namespaces/{ns}' if ns and role_kind == 'Role' else ''
    plural = 'roles' if role_kind == 'Role' else 'clusterroles'
    assert (await http.post(f'{RBAC}{scope}/{plural}', {'metadata': {'name': name}, 'rules': rules}))[0] == 201
    bscope = f'/namespaces/{ns}' if kind == 'RoleBinding' else ''
    bplural = 'rolebindings' if kind == 'RoleBinding' else 'clusterrolebindings'
    binding = {'metadata': {'name': name}, 'subjects': subjects,
               'roleRef': {'apiGroup': 'rbac.authorization.k8s.io', 'kind': role_kind, 'name': name}}
    assert (await http.post(f'{RBAC}{bscope}/{bplural}', binding))[0] == 201


def sa_subject(name: str, ns: str = 'default') -> dict[str, Any]:
    return {'kind': 'ServiceAccount', 'name': name, 'namespace': ns}


async def test_requests_without_credentials_stay_admin(http: Http) -> None:
    assert (await http.get('/api/v1/nodes'))[0] == 200
    assert (await http.get('/foo'))[0] == 404  # not a 403: the admin may, the path is not served


async def test_unauthorized_tokens(http: Http) -> None:
    for bad in ('garbage', 'a.b.c'):
        status, err, resp = await AsToken(http, bad).request('GET', '/api/v1/namespaces/default/pods')
        assert status == 401
        assert err == {'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Failure',
                       'message': 'Unauthorized', 'reason': 'Unauthorized', 'code': 401}
    op = await service_account(http, 'op')
    assert (await op.get('/api'))[0] == 200
    assert (await http.delete(f'{SA.format(ns="default")}/op'))[0] == 200
    assert (await op.get('/api'))[0] == 401  # its account is gone


async def test_forbidden_messages(http: Http) -> None:
    op = await service_account(http, 'op')
    me = user('op')
    status, err = await op.get('/api/v1/namespaces/default/pods')
    assert status == 403 and err['reason'] == 'Forbidden' and err['code'] == 403
    assert err['message'] == f'pods is forbidden: User "{me}" cannot list resource "pods" in API group "" in the ' \
                             f'namespace "default"'
    assert err['details'] == {'kind': 'pods'}
    status, err = await op.get('/api/v1/pods', watch='true')
    assert status == 403 and err['message'] == f'pods is forbidden: User "{me}" cannot watch resource "pods" in ' \
                                               f'API group "" at the cluster scope'
    status, err = await op.get(f'{DEPLOYMENTS}/x')
    assert status == 403 and err['message'] == f'deployments.apps "x" is forbidden: User "{me}" cannot get ' \
                                               f'resource "deployments" in API group "apps" in the namespace "default"'
    assert err['details'] == {'name': 'x', 'group': 'apps', 'kind': 'deployments'}
    status, err = await op.post('/api/v1/namespaces/default/pods/p/portforward', None)
    assert status == 403 and err['message'] == f'pods "p" is forbidden: User "{me}" cannot create resource ' \
                                               f'"pods/portforward" in API group "" in the namespace "default"'
    status, err = await op.get('/foo')
    assert status == 403 and err['message'] == f'forbidden: User "{me}" cannot get path "/foo"'
    assert err['details'] == {}
    status, err = await op.delete(DEPLOYMENTS)
    assert status == 403 and 'cannot deletecollection resource "deployments"' in err['message']
    status, err = await op.patch(f'{DEPLOYMENTS}/x/scale', {})
    assert status == 403 and 'cannot patch resource "deployments/scale"' in err['message']


async def test_discovery_for_every_authenticated_account(http: Http) -> None:
    op = await service_account(http, 'op')
    for path in ('/api', '/api/v1', '/apis', '/apis/apps/v1', '/version', '/healthz', '/openapi/v2'):
        assert await op.status(path) == 200, path
    status, clusterroles = await http.get(f'{RBAC}/clusterroles')
    names = {r['metadata']['name'] for r in clusterroles['items']}
    assert {'system:discovery', 'system:basic-user', 'system:public-info-viewer', 'cluster-admin'} <= names


async def test_cluster_role_binding_and_rule_matching(http: Http) -> None:
    op = await service_account(http, 'op')
    await grant(http, 'ClusterRoleBinding', 'pods-reader', [
        {'apiGroups': [''], 'resources': ['pods'], 'verbs': ['get', 'list', 'watch']},
        {'apiGroups': ['apps'], 'resources': ['*/scale'], 'verbs': ['get']},
        {'apiGroups': ['apps'], 'resources': ['deployments'], 'resourceNames': ['web'], 'verbs': ['get', 'list']},
        {'nonResourceURLs': ['/metrics', '/logs/*'], 'verbs': ['get']}], [sa_subject('op')])
    assert (await op.get('/api/v1/pods'))[0] == 200
    assert (await op.get('/api/v1/namespaces/default/pods'))[0] == 200
    assert (await op.get('/api/v1/namespaces/default/pods/nope'))[0] == 404  # allowed, then not found
    assert (await op.post(PODS, {}))[0] == 403
    assert (await op.get('/api/v1/namespaces/default/pods/p/log'))[0] == 403  # a subresource is its own
    assert (await op.get(f'{DEPLOYMENTS}/web/scale'))[0] == 404  # */scale allowed
    # resourceNames: a named get, and a list narrowed to that name by a field selector; not a plain list.
    assert (await op.get(f'{DEPLOYMENTS}/web'))[0] == 404
    assert (await op.get(f'{DEPLOYMENTS}/other'))[0] == 403
    assert (await op.get(DEPLOYMENTS))[0] == 403
    assert (await op.get(DEPLOYMENTS, fieldSelector='metadata.name=web'))[0] == 200
    assert await op.status('/logs/kubelet.log') == 404
    assert await op.status('/logsx') == 403


async def test_role_binding_to_a_cluster_role_is_namespaced(http: Http) -> None:
    assert (await http.post('/api/v1/namespaces', {'metadata': {'name': 'team'}}))[0] == 201
    op = await service_account(http, 'op', 'team')
    me = user('op', 'team')
    status, _ = await http.post(f'{RBAC}/clusterroles', {'metadata': {'name': 'cm-editor'}, 'rules': [
        {'apiGroups': [''], 'resources': ['configmaps'], 'verbs': ['*']}]})
    assert status == 201
    binding = {'metadata': {'name': 'edit'}, 'subjects': [{'kind': 'ServiceAccount', 'name': 'op'}],  # binding's ns
               'roleRef': {'apiGroup': 'rbac.authorization.k8s.io', 'kind': 'ClusterRole', 'name': 'cm-editor'}}
    assert (await http.post(f'{RBAC}/namespaces/team/rolebindings', binding))[0] == 201
    cm = {'metadata': {'name': 'c'}, 'data': {'a': '1'}}
    assert (await op.post('/api/v1/namespaces/team/configmaps', cm))[0] == 201
    status, err = await op.post('/api/v1/namespaces/default/configmaps', cm)
    assert status == 403 and err['message'] == f'configmaps is forbidden: User "{me}" cannot create resource ' \
                                               f'"configmaps" in API group "" in the namespace "default"'
    assert (await op.get('/api/v1/configmaps'))[0] == 403  # cluster scope: not by a RoleBinding
    # A binding to a role that does not exist: kube's reason is appended.
    binding = {**binding, 'metadata': {'name': 'gone'},
               'roleRef': {'apiGroup': 'rbac.authorization.k8s.io', 'kind': 'Role', 'name': 'gone'}}
    assert (await http.post(f'{RBAC}/namespaces/team/rolebindings', binding))[0] == 201
    status, err = await op.get('/api/v1/namespaces/team/secrets')
    assert status == 403 and err['message'].endswith(
        'in the namespace "team": RBAC: role.rbac.authorization.k8s.io "gone" not found')


async def test_groups_and_users_as_subjects(http: Http) -> None:
    op = await service_account(http, 'op')
    await grant(http, 'ClusterRoleBinding', 'all-sas', [
        {'apiGroups': [''], 'resources': ['services'], 'verbs': ['list']}],
        [{'kind': 'Group', 'name': 'system:serviceaccounts:default', 'apiGroup': 'rbac.authorization.k8s.io'}])
    await grant(http, 'ClusterRoleBinding', 'by-name', [
        {'apiGroups': [''], 'resources': ['secrets'], 'verbs': ['list']}],
        [{'kind': 'User', 'name': user('op'), 'apiGroup': 'rbac.authorization.k8s.io'}])
    assert (await op.get('/api/v1/services'))[0] == 200
    assert (await op.get('/api/v1/secrets'))[0] == 200
    assert (await op.get('/api/v1/configmaps'))[0] == 403


async def test_watch_is_authorized_when_it_starts(http: Http) -> None:
    op = await service_account(http, 'op')
    status, err, _ = await op.request('GET', '/api/v1/namespaces/default/configmaps', watch='true')
    assert status == 403 and 'cannot watch resource "configmaps"' in err['message']
    await grant(http, 'RoleBinding', 'watcher', [
        {'apiGroups': [''], 'resources': ['configmaps'], 'verbs': ['watch']}], [sa_subject('op')], ns='default')
    events: list[dict[str, Any]] = []
    await op.watch('/api/v1/namespaces/default/configmaps', events, timeoutSeconds=1)
    assert events == []  # a stream (ended by its timeout), not an error
    assert (await op.get('/api/v1/namespaces/default/configmaps'))[0] == 403  # list is another verb


async def test_token_bound_to_a_pod_stops_authenticating(http: Http) -> None:
    pod = {'metadata': {'name': 'p'}, 'spec': {'containers': [{'name': 'c', 'image': 'x'}]}}
    assert (await http.post(PODS, pod))[0] == 201
    status, review = await token_for(http, 'default', boundObjectRef={'kind': 'Pod', 'apiVersion': 'v1', 'name': 'p'})
    as_pod = AsToken(http, review['status']['token'])
    assert (await as_pod.get('/version'))[0] == 200
    assert (await http.delete(f'{PODS}/p', gracePeriodSeconds=0))[0] == 200
    assert (await as_pod.get('/version'))[0] == 401


async def test_expired_token(server: ApiServer, http: Http) -> None:
    assert (await http.post(SA.format(ns='default'), {'metadata': {'name': 'op'}}))[0] == 201
    _, review = await token_for(http, 'op')
    claims = claims_of(review['status']['token'])
    expired = server.emulator._token_signer.sign({**claims, 'exp': claims['iat'] - 1})
    assert (await AsToken(http, expired).get('/version'))[0] == 401
    assert (await AsToken(http, review['status']['token']).get('/version'))[0] == 200


async def test_self_subject_access_review(http: Http) -> None:
    op = await service_account(http, 'op')
    await grant(http, 'ClusterRoleBinding', 'reader', [
        {'apiGroups': [''], 'resources': ['pods'], 'verbs': ['list']}], [sa_subject('op')])
    review = {'apiVersion': 'authorization.k8s.io/v1', 'kind': 'SelfSubjectAccessReview',
              'spec': {'resourceAttributes': {'verb': 'list', 'resource': 'pods', 'namespace': 'default'}}}
    status, answer = await op.post('/apis/authorization.k8s.io/v1/selfsubjectaccessreviews', review)
    assert status == 201 and answer['status'] == {
        'allowed': True, 'reason': 'RBAC: allowed by ClusterRoleBinding "reader" of ClusterRole "reader" to '
                                   'ServiceAccount "op/default"'}
    review['spec']['resourceAttributes']['verb'] = 'delete'
    status, answer = await op.post('/apis/authorization.k8s.io/v1/selfsubjectaccessreviews', review)
    assert status == 201 and answer['status'] == {'allowed': False}


# ---------------------------------------------------------------- the audit log


async def test_audit_events(tmp_path: pathlib.Path) -> None:
    log = tmp_path / 'audit.log'
    async with ApiServer(audit_log_path=log) as srv, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        http = Http(srv.url, session)
        op = await service_account(http, 'op')
        await grant(http, 'RoleBinding', 'reader', [
            {'apiGroups': [''], 'resources': ['pods'], 'verbs': ['list', 'watch']}], [sa_subject('op')], ns='default')
        status, _, resp = await op.request('GET', PODS)
        assert status == 200
        audit_id = resp.headers['Audit-Id']  # as kube-apiserver answers
        assert (await op.get(f'{DEPLOYMENTS}/x'))[0] == 403
        assert (await AsToken(http, 'forged.token.here').get(PODS))[0] == 401
        await op.watch(PODS, [], timeoutSeconds=1)
        assert (await op.get('/api'))[0] == 200
        # The log is complete once a response is done (a watch's ResponseComplete once it ended).
        events = [json.loads(line) for line in log.read_text().splitlines()]
    assert events == srv.emulator.audit_events()
    assert all(e['kind'] == 'Event' and e['apiVersion'] == 'audit.k8s.io/v1' and e['level'] == 'Metadata'
               for e in events)
    assert len({e['auditID'] for e in events if e['stage'] == 'ResponseComplete'}) == \
        len([e for e in events if e['stage'] == 'ResponseComplete'])
    admin = next(e for e in events if e['requestURI'] == SA.format(ns='default'))
    assert admin['user'] == {'username': 'system:admin', 'groups': ['system:masters', 'system:authenticated']}
    assert admin['verb'] == 'create' and admin['responseStatus']['code'] == 201
    assert admin['annotations'] == {'authorization.k8s.io/decision': 'allow', 'authorization.k8s.io/reason': ''}

    mine = [e for e in events if e['user'].get('username') == user('op')]
    listed = next(e for e in mine if e['requestURI'] == PODS)
    assert listed['auditID'] == audit_id
    assert listed['stage'] == 'ResponseComplete' and listed['verb'] == 'list'
    assert listed['user']['groups'] == ['system:serviceaccounts', 'system:serviceaccounts:default',
                                        'system:authenticated']
    assert listed['objectRef'] == {'resource': 'pods', 'namespace': 'default', 'apiVersion': 'v1'}
    assert listed['responseStatus'] == {'metadata': {}, 'code': 200}
    assert listed['annotations'] == {
        'authorization.k8s.io/decision': 'allow',
        'authorization.k8s.io/reason': 'RBAC: allowed by RoleBinding "reader/default" of Role "reader" to '
                                       'ServiceAccount "op/default"'}
    assert listed['requestReceivedTimestamp'] <= listed['stageTimestamp']
    denied = next(e for e in mine if e['requestURI'] == f'{DEPLOYMENTS}/x')
    assert denied['verb'] == 'get' and denied['responseStatus']['code'] == 403
    assert denied['responseStatus']['reason'] == 'Forbidden'
    assert denied['objectRef'] == {'resource': 'deployments', 'namespace': 'default', 'name': 'x',
                                   'apiGroup': 'apps', 'apiVersion': 'v1'}
    assert denied['annotations']['authorization.k8s.io/decision'] == 'forbid'
    watches = [e for e in mine if e['verb'] == 'watch']
    assert [e['stage'] for e in watches] == ['ResponseStarted', 'ResponseComplete']
    assert len({e['auditID'] for e in watches}) == 1
    discovery = next(e for e in mine if e['requestURI'] == '/api')
    assert 'objectRef' not in discovery and discovery['verb'] == 'get'
    assert discovery['annotations']['authorization.k8s.io/reason'] == \
        'RBAC: allowed by ClusterRoleBinding "system:discovery" of ClusterRole "system:discovery" to Group ' \
        '"system:authenticated"'
    refused = next(e for e in events if e['responseStatus']['code'] == 401)
    assert refused['stage'] == 'ResponseStarted' and refused['user'] == {}


# ---------------------------------------------------------------- kubectl with a token kubeconfig
# client-go sends a bearer token only over TLS (never to an http:// server), as a real
# API server is always HTTPS: these tests put a TLS listener in front of the emulator.


@contextlib.asynccontextmanager
async def tls_front(srv: ApiServer, folder: pathlib.Path) -> AsyncIterator[str]:
    """The emulator also served over HTTPS on 127.0.0.1; yields its URL (``ca.crt`` in ``folder``)."""
    write_webhook_certs(folder, ['localhost'], ['127.0.0.1'])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(folder / 'tls.crt', folder / 'tls.key')
    handler = aiohttp.web.Server(srv.emulator)
    listener = await asyncio.get_running_loop().create_server(handler, '127.0.0.1', 0, ssl=context)
    try:
        yield f'https://127.0.0.1:{listener.sockets[0].getsockname()[1]}'
    finally:
        listener.close()
        await handler.shutdown(1)


def token_kubeconfig(path: pathlib.Path, url: str, ca: pathlib.Path, token: str) -> pathlib.Path:
    path.write_text(yaml.safe_dump({
        'apiVersion': 'v1', 'kind': 'Config', 'current-context': 'sa',
        'clusters': [{'name': 'e', 'cluster': {'server': url, 'certificate-authority': str(ca)}}],
        'users': [{'name': 'sa', 'user': {'token': token}}],
        'contexts': [{'name': 'sa', 'context': {'cluster': 'e', 'user': 'sa', 'namespace': 'default'}}]}))
    return path


async def kubectl_async(kubeconfig: pathlib.Path, *args: str) -> tuple[int, str, str]:
    """kubectl without blocking the event loop (the API server runs in it)."""
    env = {**os.environ, 'KUBECONFIG': str(kubeconfig), 'KUBECACHEDIR': str(kubeconfig.parent / 'cache')}
    proc = await asyncio.create_subprocess_exec(KUBECTL, *args, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_kubectl_with_a_service_account_token(server: ApiServer, http: Http, tmp_path: pathlib.Path) -> None:
    admin = tmp_path / 'admin'
    write_kubeconfig(admin, server.url)
    assert (await http.post(SA.format(ns='default'), {'metadata': {'name': 'op'}}))[0] == 201
    code, out, err = await kubectl_async(admin, 'create', 'token', 'op', '--duration', '1h')
    if code != 0 and 'unknown format' in err:
        # kubectl sends the TokenRequest as protobuf: decoded once emulator/protobuf.py knows the kind.
        _, review = await token_for(http, 'op')
        token = review['status']['token']
    else:
        assert code == 0, err
        token = out.strip()
        assert claims_of(token)['exp'] - claims_of(token)['iat'] == 3600
    code, _, err = await kubectl_async(admin, 'create', 'token', 'missing')
    assert code != 0 and 'serviceaccounts "missing" not found' in err or 'unknown format' in err

    async with tls_front(server, tmp_path / 'tls') as url:
        config = token_kubeconfig(tmp_path / 'sa', url, tmp_path / 'tls' / 'ca.crt', token)
        code, _, err = await kubectl_async(config, 'get', 'pods')
        assert code == 1 and err.strip() == 'Error from server (Forbidden): pods is forbidden: User ' \
            '"system:serviceaccount:default:op" cannot list resource "pods" in API group "" in the namespace "default"'
        await grant(http, 'RoleBinding', 'reader', [
            {'apiGroups': [''], 'resources': ['pods'], 'verbs': ['get', 'list']}], [sa_subject('op')], ns='default')
        code, out, err = await kubectl_async(config, 'get', 'pods')
        assert code == 0 and 'No resources found in default namespace.' in err
        code, out, err = await kubectl_async(config, 'get', 'pods', '-n', 'kube-system')
        assert code == 1 and 'in the namespace "kube-system"' in err
        code, out, err = await kubectl_async(config, 'auth', 'can-i', 'list', 'pods')
        if 'unknown format' not in err:  # a SelfSubjectAccessReview, also sent as protobuf
            assert out.strip() == 'yes'
            code, out, _ = await kubectl_async(config, 'auth', 'can-i', 'delete', 'pods')
            assert out.strip() == 'no' and code == 1
        forged = token_kubeconfig(tmp_path / 'forged', url, tmp_path / 'tls' / 'ca.crt', token[:-4] + 'AAAA')
        code, _, err = await kubectl_async(forged, 'get', 'pods')
        assert code == 1 and 'error: You must be logged in to the server (Unauthorized)' in err


# ---------------------------------------------------------------- the pure parts other code uses


def test_request_attributes_as_kube_derives_them() -> None:
    sa = UserInfo('system:serviceaccount:ns:sa', groups=('system:authenticated',))

    def derived(method: str, path: str, **query: str) -> tuple[Any, ...]:
        a = request_attributes(method, path, query, sa)
        if not a.resource_request:
            return (a.verb, a.path)
        return (a.verb, a.api_group, a.resource, a.subresource, a.namespace, a.name)

    assert derived('GET', '/api/v1/namespaces/ns/pods') == ('list', '', 'pods', '', 'ns', '')
    assert derived('GET', '/api/v1/namespaces/ns/pods', watch='true') == ('watch', '', 'pods', '', 'ns', '')
    assert derived('GET', '/api/v1/watch/namespaces/ns/pods/p') == ('watch', '', 'pods', '', 'ns', 'p')
    assert derived('GET', '/api/v1/pods', fieldSelector='metadata.name=p') == ('list', '', 'pods', '', '', 'p')
    assert derived('GET', '/apis/apps/v1/namespaces/ns/deployments/d') == ('get', 'apps', 'deployments', '', 'ns', 'd')
    assert derived('PUT', '/apis/apps/v1/namespaces/ns/deployments/d/scale') == \
        ('update', 'apps', 'deployments', 'scale', 'ns', 'd')
    assert derived('PATCH', '/api/v1/namespaces/ns/pods/p/status') == ('patch', '', 'pods', 'status', 'ns', 'p')
    assert derived('POST', '/api/v1/namespaces/ns/pods') == ('create', '', 'pods', '', 'ns', '')
    assert derived('POST', '/api/v1/namespaces/ns/pods/p/eviction') == ('create', '', 'pods', 'eviction', 'ns', 'p')
    assert derived('GET', '/api/v1/namespaces/ns/pods/p/exec') == ('get', '', 'pods', 'exec', 'ns', 'p')
    assert derived('DELETE', '/api/v1/namespaces/ns/pods/p') == ('delete', '', 'pods', '', 'ns', 'p')
    assert derived('DELETE', '/api/v1/namespaces/ns/pods') == ('deletecollection', '', 'pods', '', 'ns', '')
    assert derived('GET', '/api/v1/namespaces/ns') == ('get', '', 'namespaces', '', 'ns', 'ns')
    assert derived('PUT', '/api/v1/namespaces/ns/finalize') == ('update', '', 'namespaces', 'finalize', 'ns', 'ns')
    assert derived('GET', '/api/v1/namespaces') == ('list', '', 'namespaces', '', '', '')
    assert derived('GET', '/apis/apps/v1') == ('get', '/apis/apps/v1')
    assert derived('GET', '/api/v1') == ('get', '/api/v1')
    assert derived('GET', '/healthz') == ('get', '/healthz')
    assert derived('POST', '/logs') == ('post', '/logs')


def test_rule_allows() -> None:
    def attrs(verb: str, resource: str = '', sub: str = '', name: str = '', group: str = '',
              path: str = '') -> RequestAttributes:
        return RequestAttributes(user='u', groups=(), verb=verb, resource_request=not path, path=path,
                                 api_group=group, resource=resource, subresource=sub, name=name)

    rule = {'apiGroups': ['apps'], 'resources': ['deployments', 'deployments/status'], 'verbs': ['get', 'patch']}
    assert rule_allows(rule, attrs('get', 'deployments', group='apps'))
    assert rule_allows(rule, attrs('patch', 'deployments', 'status', 'd', group='apps'))
    assert not rule_allows(rule, attrs('patch', 'deployments', 'scale', 'd', group='apps'))
    assert not rule_allows(rule, attrs('get', 'deployments', group=''))
    assert not rule_allows(rule, attrs('list', 'deployments', group='apps'))
    assert rule_allows({'apiGroups': ['*'], 'resources': ['*'], 'verbs': ['*']}, attrs('get', 'pods', 'log', 'p'))
    assert rule_allows({'apiGroups': ['apps'], 'resources': ['*/scale'], 'verbs': ['update']},
                       attrs('update', 'statefulsets', 'scale', 's', group='apps'))
    named = {'apiGroups': [''], 'resources': ['configmaps'], 'resourceNames': ['c'], 'verbs': ['*']}
    assert rule_allows(named, attrs('update', 'configmaps', name='c'))
    assert not rule_allows(named, attrs('update', 'configmaps', name='d'))
    for verb in ('list', 'watch', 'create', 'deletecollection'):
        assert not rule_allows(named, attrs(verb, 'configmaps'))  # no name: not matched by resourceNames
    urls = {'nonResourceURLs': ['/healthz', '/apis/*'], 'verbs': ['get']}
    assert rule_allows(urls, attrs('get', path='/healthz')) and rule_allows(urls, attrs('get', path='/apis/apps'))
    assert not rule_allows(urls, attrs('get', path='/healthz/etcd')) and not rule_allows(urls, attrs('post', path='/healthz'))
    assert not rule_allows(urls, attrs('get', 'pods'))  # a resource request is not matched by URLs
    assert not rule_allows(rule, attrs('get', path='/apis/apps'))


def test_attributes_of_audit_events() -> None:
    event = {'verb': 'get', 'requestURI': '/api/v1/namespaces/ns/pods/p/portforward?ports=8786',
             'user': {'username': 'u', 'groups': ['g']},
             'objectRef': {'resource': 'pods', 'namespace': 'ns', 'name': 'p', 'apiVersion': 'v1',
                           'subresource': 'portforward'}}
    checks = attributes_of_audit_event(event)
    assert [(a.verb, a.resource, a.subresource, a.namespace, a.name) for a in checks] == [
        ('get', 'pods', 'portforward', 'ns', 'p'), ('create', 'pods', 'portforward', 'ns', 'p')]
    assert attributes_of_audit_event({'verb': 'get', 'requestURI': '/version?timeout=5s', 'user': {}}) == [
        RequestAttributes(user='', groups=(), verb='get', resource_request=False, path='/version')]


def test_local_stack_writes_the_audit_log(tmp_path: pathlib.Path) -> None:
    from dmo_devstack.stack import LocalStack

    with LocalStack(tmp_path, crd_dirs=[], dask_operator=False, kubelet=False) as stack:
        assert stack.audit_log_path == tmp_path.resolve() / 'audit.log'
        stack.kubectl('get', 'serviceaccounts', '-n', 'kube-system')
        events = stack.audit_events()
    listed = [e for e in events if e['verb'] == 'list' and e.get('objectRef', {}).get('resource') == 'serviceaccounts']
    assert listed and listed[-1]['objectRef']['namespace'] == 'kube-system'
    assert listed[-1]['user']['username'] == 'system:admin' and listed[-1]['userAgent'].startswith('kubectl/')
    assert listed[-1]['responseStatus']['code'] == 200 and listed[-1]['stage'] == 'ResponseComplete'


async def test_websocket_connect_also_needs_create(http: Http) -> None:
    op = await service_account(http, 'op')
    me = user('op')
    await grant(http, 'RoleBinding', 'exec-get', [
        {'apiGroups': [''], 'resources': ['pods/exec', 'pods/log'], 'verbs': ['get']}], [sa_subject('op')],
        ns='default')
    # The websocket upgrade is a GET (get), and since Kubernetes 1.35 must also be allowed create.
    status, err = await op.get('/api/v1/namespaces/default/pods/p/exec', command='sh')
    assert status == 403 and err['message'] == f'pods "p" is forbidden: User "{me}" cannot create resource ' \
                                               f'"pods/exec" in API group "" in the namespace "default"'
    assert (await op.get('/api/v1/namespaces/default/pods/p/log'))[0] == 404  # not a connect: get is enough
    await grant(http, 'RoleBinding', 'exec-create', [
        {'apiGroups': [''], 'resources': ['pods/exec'], 'verbs': ['create']}], [sa_subject('op')], ns='default')
    assert (await op.get('/api/v1/namespaces/default/pods/p/exec', command='sh'))[0] == 404  # allowed (not served)
