"""
Service accounts, their tokens, authentication, RBAC and the audit log of the
emulated API server, over real HTTP (and kubectl with a token kubeconfig), checked
against what a real kube-apiserver answers.
"""
from __future__ import annotations

import base64
import json
from typing import Any

from test_emulator import Http, http, server, wait_for
from dask_memory_operator.devstack.apiserver import ApiServer

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
