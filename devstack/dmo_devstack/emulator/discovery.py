"""
Discovery: ``/version``, ``/api``, ``/apis``, group and resource lists, ``/openapi``.

kubectl, kr8s and kopf find resources through discovery (kopf silently never watches
a resource it cannot find). The OpenAPI documents are minimal but valid: enough for
``kubectl apply`` to decide to validate server-side (``fieldValidation=Strict``).
"""
from __future__ import annotations

import re
from typing import Any

import aiohttp.web

from .errors import ApiError
from .wire import json_response
from .resources import VERBS

def version_priority(version: str) -> tuple[int, int, int]:
    """Kubernetes' version ordering: GA > beta > alpha, higher numbers first."""
    m = re.fullmatch(r'v(\d+)(?:(alpha|beta)(\d+))?', version)
    if not m:
        return (3, 0, 0)
    stage = {'alpha': 2, 'beta': 1, None: 0}[m.group(2)]
    return (stage, -int(m.group(1)), -int(m.group(3) or 0))



class Discovery:
    """The discovery documents (a mixin of ``KubeEmulator``)."""

    def _version_info(self) -> dict[str, Any]:
        return {'major': '1', 'minor': '32', 'gitVersion': 'v1.32.0-kmock', 'gitCommit': '',
                'gitTreeState': 'clean', 'buildDate': '2024-12-11T00:00:00Z', 'goVersion': 'go1.23.4',
                'compiler': 'gc', 'platform': 'linux/amd64'}

    def _groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for (group, version, _) in self._types:
            if group and version not in groups.setdefault(group, []):
                groups[group].append(version)
        for versions in groups.values():
            versions.sort(key=version_priority)
        return groups

    def _api_group(self, name: str) -> dict[str, Any] | None:
        versions = self._groups().get(name)
        if not versions:
            return None
        gvs = [{'groupVersion': f'{name}/{v}', 'version': v} for v in versions]
        return {'kind': 'APIGroup', 'apiVersion': 'v1', 'name': name, 'versions': gvs, 'preferredVersion': gvs[0]}

    def _api_group_list(self) -> dict[str, Any]:
        groups = [self._api_group(name) for name in sorted(self._groups())]
        return {'kind': 'APIGroupList', 'apiVersion': 'v1', 'groups': groups}

    def _api_resource_list(self, group: str, version: str) -> dict[str, Any]:
        types = [t for (g, v, _), t in sorted(self._types.items()) if (g, v) == (group, version)]
        if not types:
            raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
        resources = []
        for t in types:
            resources.append({'name': t.plural, 'singularName': t.singular, 'namespaced': t.namespaced,
                              'kind': t.kind, 'verbs': VERBS, 'shortNames': t.shortnames,
                              'categories': t.categories, 'storageVersionHash': ''})
            for sub in sorted(t.subresources):
                kind = 'Scale' if sub == 'scale' else t.kind
                entry = {'name': f'{t.plural}/{sub}', 'singularName': '', 'namespaced': t.namespaced,
                         'kind': kind, 'verbs': ['get', 'patch', 'update']}
                if sub == 'scale':
                    entry.update(group='autoscaling', version='v1')
                if sub == 'token':  # serviceaccounts/token takes a TokenRequest
                    entry.update(kind='TokenRequest', group='authentication.k8s.io', version='v1', verbs=['create'])
                resources.append(entry)
        return {'kind': 'APIResourceList', 'apiVersion': 'v1',
                'groupVersion': f'{group}/{version}' if group else version, 'resources': resources}

    def _serve_openapi(self, path: str) -> aiohttp.web.StreamResponse:
        # kubectl only needs a valid document to go on; it then validates server-side
        # (fieldValidation=Strict), which this emulator implements for custom resources.
        if path.rstrip('/') == '/openapi/v2':
            return json_response({'swagger': '2.0', 'info': {'title': 'Kubernetes', 'version': 'v1.32.0'},
                          'paths': {}, 'definitions': {}})
        if path.rstrip('/') == '/openapi/v3':
            paths = {}
            for (group, version, _) in self._types:
                gv = f'apis/{group}/{version}' if group else f'api/{version}'
                paths[gv] = {'serverRelativeURL': f'/openapi/v3/{gv}'}
            return json_response({'paths': paths})
        # A group-version document: one path per resource whose PATCH declares its kind and
        # the fieldValidation parameter (what kubectl checks before validating server-side).
        gv = path.rstrip('/').removeprefix('/openapi/v3/').split('/')
        group, version = ('', gv[1]) if gv[0] == 'api' and len(gv) == 2 else \
            (gv[1], gv[2]) if gv[0] == 'apis' and len(gv) == 3 else (None, None)
        paths = {}
        for (g, v, plural), t in self._types.items():
            if (g, v) != (group, version):
                continue
            prefix = f'/apis/{g}/{v}' if g else f'/api/{v}'
            scope = '/namespaces/{namespace}' if t.namespaced else ''
            paths[f'{prefix}{scope}/{plural}/{{name}}'] = {'patch': {
                'x-kubernetes-group-version-kind': {'group': g, 'version': v, 'kind': t.kind},
                'parameters': [{'name': name, 'in': 'query', 'schema': {'type': 'string', 'uniqueItems': True}}
                               for name in ('dryRun', 'fieldManager', 'fieldValidation', 'force')],
                'responses': {'200': {'description': 'OK'}}}}
        if not paths:
            raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
        return json_response({'openapi': '3.0.0', 'info': {'title': 'Kubernetes', 'version': 'v1.32.0'},
                      'paths': paths, 'components': {'schemas': {}}})
