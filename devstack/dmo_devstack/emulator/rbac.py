"""
Authorization: kube's RBAC authorizer, for the requests of service accounts.

What a workload may do is what the Roles and ClusterRoles bound to its
ServiceAccount allow; a chart's RBAC is proven by running its workload under them.
This module is the three parts of kube-apiserver that decide it:

- ``request_attributes``: the attributes kube's ``RequestInfoFactory`` derives from
  a request (``RequestAttributes``). Resource requests are ``/api/v1/...`` and
  ``/apis/GROUP/VERSION/...`` with at least a resource; everything else (``/api``,
  ``/api/v1``, ``/apis/apps/v1``, ``/version``, ``/healthz``, ``/openapi/v2``) is a
  non-resource request, its verb the lower-cased HTTP method. Verbs:

  ============================================  ===================================
  request                                        verb
  ============================================  ===================================
  GET/HEAD with a name                           get
  GET/HEAD without a name                        list, or watch with ``watch=true``
  GET ``/api/v1/watch/...`` (legacy prefix)      watch (with or without a name)
  POST                                           create
  PUT                                            update
  PATCH                                          patch
  DELETE with a name                             delete
  DELETE without a name                          deletecollection
  ============================================  ===================================

  ``/namespaces/NS/RES/NAME/SUB``: namespace NS, resource RES, name NAME,
  subresource SUB (``pods/exec``, ``pods/portforward``, ``serviceaccounts/token``,
  ``deployments/scale``...); ``/api/v1/namespaces/NS`` is the namespace object,
  with namespace NS too (as kube). A list or watch with ``fieldSelector=
  metadata.name=X`` has the name X (so ``resourceNames`` rules can allow it).
- ``rule_allows``: kube's ``RuleAllows``: verbs, apiGroups, resources (``res``,
  ``res/sub``, ``*``, ``*/sub``), resourceNames (a request without a name — list,
  watch, create, deletecollection — is not matched by a rule with resourceNames),
  nonResourceURLs (exact, or a prefix ending in ``*``).
- The authorizer: ClusterRoleBindings (to ClusterRoles), then the RoleBindings of
  the request's namespace (to a Role of that namespace or a ClusterRole), whose
  subjects (User, Group, ServiceAccount — namespace defaulting to the binding's)
  match the user; the first rule that allows decides, with kube's reason
  (``RBAC: allowed by ClusterRoleBinding "b" of ClusterRole "r" to ServiceAccount
  "sa/ns"``). A denial is kube's 403 (``responsewriters.Forbidden``):
  ``pods is forbidden: User "system:serviceaccount:ns:sa" cannot list resource
  "pods" in API group "" in the namespace "ns"`` (``at the cluster scope``, with a
  name ``deployments.apps "x" is forbidden: ...``, non-resource ``forbidden: User
  "..." cannot get path "/foo"``), reason Forbidden, details {name, group, kind};
  a binding to a missing role adds kube's ``: RBAC: clusterrole.rbac.authorization.
  k8s.io "r" not found``.

Authorization happens at the start of every request (a watch is authorized once,
when it starts), before admission and before the handler: a denied request for a
path the emulator does not serve (``pods/exec``) is 403, as on a real server.

The bootstrap policy a cluster has for every authenticated user is created as real
objects at startup, as kube-apiserver's RBAC post-start hook does (labelled
``kubernetes.io/bootstrapping: rbac-defaults``): the ClusterRoles
``system:discovery``, ``system:basic-user``, ``system:public-info-viewer`` bound to
``system:authenticated``, and ``cluster-admin`` bound to ``system:masters``.
``SelfSubjectAccessReview`` (``kubectl auth can-i``) answers with the same
authorizer for the requesting user.

Approximated: ``system:masters`` (the credential-less admin, see ``authn``) is
allowed everything before RBAC, as kube's privileged-group authorizer does; the
Node authorizer, aggregated ClusterRoles (``admin``, ``edit``, ``view``) and the
escalation checks on writing roles and bindings are not emulated. Connect
subresources follow Kubernetes 1.35+: a GET (the websocket upgrade) of
``pods/exec``, ``pods/attach`` or ``pods/portforward`` is authorized as ``get`` and
must also be allowed ``create`` (``AuthorizePodWebsocketUpgradeCreatePermission``,
on by default since 1.35; 1.32 checked ``get`` only); SPDY's POST is ``create``.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs

from .authn import MASTERS_GROUP, UserInfo
from .errors import ApiError

#: Subresources of a namespace that stay the namespace object (``namespaceSubresources``).
_NAMESPACE_SUBRESOURCES = {'status', 'finalize'}
#: Connect subresources whose websocket GET must also be allowed ``create`` (1.35+).
WEBSOCKET_CREATE_SUBRESOURCES = {('', 'pods', 'exec'), ('', 'pods', 'attach'), ('', 'pods', 'portforward')}
_TRUE = {'1', 't', 'T', 'TRUE', 'true', 'True'}  # strconv.ParseBool, as the query decoder
RBAC_GROUP = 'rbac.authorization.k8s.io'


@attrs.frozen
class RequestAttributes:
    """``authorizer.Attributes``: what a request asks to do, as the RBAC authorizer sees it.

    ``resource_request`` tells a resource request (``api_group``, ``api_version``,
    ``resource``, ``subresource``, ``namespace``, ``name`` set) from a non-resource one
    (only ``path``). ``verb`` is kube's verb (see the module docstring).
    """
    user: str
    groups: tuple[str, ...]
    verb: str
    resource_request: bool
    path: str = ''
    api_group: str = ''
    api_version: str = ''
    resource: str = ''
    subresource: str = ''
    namespace: str = ''
    name: str = ''

    def with_verb(self, verb: str) -> RequestAttributes:
        return attrs.evolve(self, verb=verb)


@attrs.frozen
class Decision:
    """The authorizer's answer: allowed or not, and kube's reason (audit annotation, review status)."""
    allowed: bool
    reason: str = ''


# ------------------------------------------------------------------ request attributes


def request_attributes(method: str, path: str, query: Mapping[str, str], user: UserInfo) -> RequestAttributes:
    """The attributes kube's ``RequestInfoFactory.NewRequestInfo`` derives from a request."""
    parts = [p for p in path.split('/') if p]
    base = {'user': user.name, 'groups': tuple(user.groups), 'path': path}
    non_resource = RequestAttributes(verb=method.lower(), resource_request=False, **base)
    if len(parts) < 3 or parts[0] not in ('api', 'apis'):
        return non_resource
    rest = parts[1:]
    group = ''
    if parts[0] == 'apis':
        if len(rest) < 3:
            return non_resource
        group, rest = rest[0], rest[1:]
    version, rest = rest[0], rest[1:]
    if rest[0] == 'watch' or rest[0] == 'proxy':  # the legacy verb prefixes (specialVerbs)
        if len(rest) < 2:
            return non_resource  # kube fails such a request; here it is not found further on
        verb, rest = rest[0], rest[1:]
    else:
        verb = {'POST': 'create', 'GET': 'get', 'HEAD': 'get', 'PUT': 'update', 'PATCH': 'patch',
                'DELETE': 'delete'}.get(method.upper(), '')
    namespace = ''
    if rest[0] == 'namespaces' and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in _NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) >= 2 else ''
    subresource = rest[2] if len(rest) >= 3 and verb != 'proxy' else ''
    if not name and verb == 'get':
        verb = 'watch' if query.get('watch', 'false') in _TRUE else 'list'
        name = _exact_name(query.get('fieldSelector', ''))
    if not name and verb == 'delete':
        verb = 'deletecollection'
    return RequestAttributes(verb=verb, resource_request=True, api_group=group, api_version=version,
                             resource=resource, subresource=subresource, namespace=namespace, name=name, **base)


def _exact_name(field_selector: str) -> str:
    """``fields.Selector.RequiresExactMatch("metadata.name")``, when the name is a valid path segment."""
    for term in field_selector.split(','):
        key, op, value = term.partition('==') if '==' in term else term.partition('=')
        if op and key.strip() == 'metadata.name' and not key.endswith('!'):
            value = value.strip()
            return value if value not in ('', '.', '..') and '/' not in value and '%' not in value else ''
    return ''


# ------------------------------------------------------------------ rules


def rule_allows(rule: Mapping[str, Any], attrs: RequestAttributes) -> bool:
    """kube's ``RuleAllows``: whether one PolicyRule (as in a Role's ``rules``) allows a request."""
    if not _matches(rule.get('verbs'), attrs.verb):
        return False
    if not attrs.resource_request:
        return any(url == '*' or url == attrs.path or (url.endswith('*') and attrs.path.startswith(url.rstrip('*')))
                   for url in rule.get('nonResourceURLs') or [])
    combined = f'{attrs.resource}/{attrs.subresource}' if attrs.subresource else attrs.resource
    return _matches(rule.get('apiGroups'), attrs.api_group) and \
        _resource_matches(rule.get('resources') or [], combined, attrs.subresource) and \
        (not rule.get('resourceNames') or attrs.name in rule['resourceNames'])


def _matches(values: Iterable[str] | None, wanted: str) -> bool:
    return any(v == '*' or v == wanted for v in values or [])


def _resource_matches(resources: Iterable[str], combined: str, subresource: str) -> bool:
    for resource in resources:
        if resource == '*' or resource == combined:
            return True
        if subresource and resource == f'*/{subresource}':
            return True
    return False


def applies_to(subject: Mapping[str, Any], user: str, groups: Iterable[str], binding_namespace: str) -> bool:
    """kube's ``appliesToUser``: a binding's subject names this user."""
    kind, name = subject.get('kind'), subject.get('name')
    if kind == 'User':
        return name == user
    if kind == 'Group':
        return name in groups
    if kind == 'ServiceAccount':
        namespace = subject.get('namespace') or binding_namespace
        return bool(namespace) and user == f'system:serviceaccount:{namespace}:{name}'
    return False


def _describe_subject(subject: Mapping[str, Any], binding_namespace: str) -> str:
    if subject.get('kind') == 'ServiceAccount':
        return f'ServiceAccount "{subject.get("name")}/{subject.get("namespace") or binding_namespace}"'
    return f'{subject.get("kind")} "{subject.get("name")}"'


# ------------------------------------------------------------------ the answers


def forbidden_message(attrs: RequestAttributes) -> str:
    """``responsewriters.forbiddenMessage``."""
    if not attrs.resource_request:
        return f'User "{attrs.user}" cannot {attrs.verb} path "{attrs.path}"'
    resource = f'{attrs.resource}/{attrs.subresource}' if attrs.subresource else attrs.resource
    scope = f'in the namespace "{attrs.namespace}"' if attrs.namespace else 'at the cluster scope'
    return f'User "{attrs.user}" cannot {attrs.verb} resource "{resource}" in API group "{attrs.api_group}" {scope}'


def forbidden(attrs: RequestAttributes, reason: str = '') -> ApiError:
    """The 403 of ``responsewriters.Forbidden`` (``apierrors.NewForbidden`` of the group and resource)."""
    err = forbidden_message(attrs) + (f': {reason}' if reason else '')
    qualified = f'{attrs.resource}.{attrs.api_group}' if attrs.api_group else attrs.resource
    if not attrs.resource_request or not attrs.resource:
        message = f'forbidden: {err}'
    elif attrs.name:
        message = f'{qualified} "{attrs.name}" is forbidden: {err}'
    else:
        message = f'{qualified} is forbidden: {err}'
    details = {k: v for k, v in (('name', attrs.name), ('group', attrs.api_group), ('kind', attrs.resource))
               if v and attrs.resource_request}
    return ApiError(403, 'Forbidden', message, details)


def attributes_of_audit_event(event: Mapping[str, Any]) -> list[RequestAttributes]:
    """The authorization checks an audit event of this emulator stands for (for rule-use checks).

    One per event, two for a GET of a websocket connect subresource (``get`` and the
    compound ``create``).
    """
    user = event.get('user') or {}
    base = {'user': user.get('username', ''), 'groups': tuple(user.get('groups') or []),
            'path': urlsplit(event.get('requestURI', '')).path}
    ref = event.get('objectRef')
    if ref is None:
        return [RequestAttributes(verb=event.get('verb', ''), resource_request=False, **base)]
    attrs_ = RequestAttributes(
        verb=event.get('verb', ''), resource_request=True, api_group=ref.get('apiGroup', ''),
        api_version=ref.get('apiVersion', ''), resource=ref.get('resource', ''),
        subresource=ref.get('subresource', ''), namespace=ref.get('namespace', ''), name=ref.get('name', ''), **base)
    if attrs_.verb == 'get' and (attrs_.api_group, attrs_.resource, attrs_.subresource) in \
            WEBSOCKET_CREATE_SUBRESOURCES:
        return [attrs_, attrs_.with_verb('create')]
    return [attrs_]


# ------------------------------------------------------------------ the bootstrap policy


def _bootstrap_role(name: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {'apiVersion': f'{RBAC_GROUP}/v1', 'kind': 'ClusterRole', 'metadata': {
        'name': name, 'labels': {'kubernetes.io/bootstrapping': 'rbac-defaults'},
        'annotations': {'rbac.authorization.kubernetes.io/autoupdate': 'true'}}, 'rules': rules}


def _bootstrap_binding(name: str, groups: list[str]) -> dict[str, Any]:
    return {'apiVersion': f'{RBAC_GROUP}/v1', 'kind': 'ClusterRoleBinding', 'metadata': {
        'name': name, 'labels': {'kubernetes.io/bootstrapping': 'rbac-defaults'},
        'annotations': {'rbac.authorization.kubernetes.io/autoupdate': 'true'}},
        'roleRef': {'apiGroup': RBAC_GROUP, 'kind': 'ClusterRole', 'name': name},
        'subjects': [{'apiGroup': RBAC_GROUP, 'kind': 'Group', 'name': g} for g in groups]}


#: From kube's ``bootstrappolicy`` (ClusterRoles() and ClusterRoleBindings()), the part every user meets.
BOOTSTRAP_POLICY: list[dict[str, Any]] = [
    _bootstrap_role('cluster-admin', [{'apiGroups': ['*'], 'resources': ['*'], 'verbs': ['*']},
                                      {'nonResourceURLs': ['*'], 'verbs': ['*']}]),
    _bootstrap_role('system:discovery', [{'nonResourceURLs': [
        '/api', '/api/*', '/apis', '/apis/*', '/healthz', '/livez', '/openapi', '/openapi/*', '/readyz',
        '/version', '/version/'], 'verbs': ['get']}]),
    _bootstrap_role('system:basic-user', [
        {'apiGroups': ['authorization.k8s.io'], 'resources': ['selfsubjectaccessreviews', 'selfsubjectrulesreviews'],
         'verbs': ['create']},
        {'apiGroups': ['authentication.k8s.io'], 'resources': ['selfsubjectreviews'], 'verbs': ['create']}]),
    _bootstrap_role('system:public-info-viewer', [{'nonResourceURLs': [
        '/healthz', '/livez', '/readyz', '/version', '/version/'], 'verbs': ['get']}]),
    _bootstrap_binding('cluster-admin', [MASTERS_GROUP]),
    _bootstrap_binding('system:discovery', ['system:authenticated']),
    _bootstrap_binding('system:basic-user', ['system:authenticated']),
    _bootstrap_binding('system:public-info-viewer', ['system:authenticated', 'system:unauthenticated']),
]


class Authorization:
    """The RBAC authorizer and SelfSubjectAccessReview (a mixin of ``KubeEmulator``)."""

    def _create_bootstrap_policy(self) -> None:
        for doc in BOOTSTRAP_POLICY:
            plural = 'clusterroles' if doc['kind'] == 'ClusterRole' else 'clusterrolebindings'
            self._store_new(self._types[RBAC_GROUP, 'v1', plural], None, copy.deepcopy(doc))

    def authorize(self, attrs: RequestAttributes) -> Decision:
        """The union of the privileged-group and RBAC authorizers, as kube-apiserver's chain."""
        if MASTERS_GROUP in attrs.groups:
            return Decision(True)
        errors: list[str] = []
        for binding, namespace in self._bindings_for(attrs.namespace):
            subject = next((s for s in binding.get('subjects') or []
                            if applies_to(s, attrs.user, attrs.groups, namespace)), None)
            if subject is None:
                continue
            rules = self._role_rules(binding.get('roleRef') or {}, namespace)
            if isinstance(rules, str):
                errors.append(rules)
                continue
            if any(rule_allows(rule, attrs) for rule in rules):
                return Decision(True, f'RBAC: allowed by {_describe_binding(binding, namespace, subject)}')
        if not errors:
            return Decision(False)
        return Decision(False, 'RBAC: ' + (errors[0] if len(errors) == 1 else '[' + ', '.join(errors) + ']'))

    def authorize_all(self, attrs: RequestAttributes) -> tuple[RequestAttributes, Decision]:
        """The request's own check, then the compound ``create`` of a websocket connect (1.35+).

        Returns the attributes a denial is about and the decision (of the first denial, or
        of the request's own check when all are allowed).
        """
        decision = self.authorize(attrs)
        if decision.allowed and attrs.verb == 'get' and \
                (attrs.api_group, attrs.resource, attrs.subresource) in WEBSOCKET_CREATE_SUBRESOURCES:
            create = attrs.with_verb('create')
            second = self.authorize(create)
            if not second.allowed:
                return create, second
        return attrs, decision

    def _bindings_for(self, namespace: str) -> list[tuple[dict[str, Any], str]]:
        """ClusterRoleBindings (binding namespace ''), then the RoleBindings of the namespace."""
        crbs = sorted((o for _, o in self._live_items(self._types[RBAC_GROUP, 'v1', 'clusterrolebindings'])),
                      key=lambda o: o['metadata']['name'])
        out = [(b, '') for b in crbs]
        if namespace:
            rbs = sorted((o for _, o in self._live_items(self._types[RBAC_GROUP, 'v1', 'rolebindings'], namespace)),
                         key=lambda o: o['metadata']['name'])
            out += [(b, namespace) for b in rbs]
        return out

    def _role_rules(self, ref: Mapping[str, Any], namespace: str) -> list[dict[str, Any]] | str:
        """The rules of a binding's roleRef, or kube's lister error when the role is missing."""
        kind, name = ref.get('kind'), ref.get('name') or ''
        if kind == 'ClusterRole':
            role = self._get_live(self._types[RBAC_GROUP, 'v1', 'clusterroles'], None, name)
            missing = f'clusterrole.{RBAC_GROUP} "{name}" not found'
        elif kind == 'Role' and namespace:
            role = self._get_live(self._types[RBAC_GROUP, 'v1', 'roles'], namespace, name)
            missing = f'role.{RBAC_GROUP} "{name}" not found'
        else:
            return f'unsupported role reference kind: "{kind}"'
        if role is None:
            return missing
        return [r for r in role.get('rules') or [] if isinstance(r, Mapping)]

    # ------------------------------------------------------------- SelfSubjectAccessReview

    def _self_subject_access_review(self, body: Any, user: UserInfo) -> dict[str, Any]:
        """POST selfsubjectaccessreviews: what the authorizer answers for the requesting user (201)."""
        if not isinstance(body, Mapping):
            raise ApiError(400, 'BadRequest', 'the body of the request was not a JSON object')
        spec = body.get('spec') or {}
        res, nonres = spec.get('resourceAttributes'), spec.get('nonResourceAttributes')
        if bool(res) == bool(nonres):
            detail = 'exactly one of nonResourceAttributes or resourceAttributes must be specified'
            raise ApiError(422, 'Invalid', f'SelfSubjectAccessReview.authorization.k8s.io "" is invalid: '
                           f'spec.resourceAttributes: Invalid value: "null": {detail}',
                           {'group': 'authorization.k8s.io', 'kind': 'SelfSubjectAccessReview', 'causes': [
                               {'reason': 'FieldValueInvalid', 'message': f'Invalid value: "null": {detail}',
                                'field': 'spec.resourceAttributes'}]})
        base = {'user': user.name, 'groups': tuple(user.groups)}
        if res:
            attrs = RequestAttributes(
                verb=res.get('verb', ''), resource_request=True, api_group=res.get('group', ''),
                api_version=res.get('version', ''), resource=res.get('resource', ''),
                subresource=res.get('subresource', ''), namespace=res.get('namespace', ''),
                name=res.get('name', ''), **base)
        else:
            attrs = RequestAttributes(verb=nonres.get('verb', ''), resource_request=False,
                                      path=nonres.get('path', ''), **base)
        decision = self.authorize(attrs)
        status: dict[str, Any] = {'allowed': decision.allowed}
        if decision.reason:
            status['reason'] = decision.reason
        return {'kind': 'SelfSubjectAccessReview', 'apiVersion': 'authorization.k8s.io/v1',
                'metadata': {'creationTimestamp': None}, 'spec': dict(spec), 'status': status}


def _describe_binding(binding: Mapping[str, Any], namespace: str, subject: Mapping[str, Any]) -> str:
    ref = binding.get('roleRef') or {}
    name = binding['metadata']['name']
    if namespace:
        return f'RoleBinding "{name}/{namespace}" of {ref.get("kind")} "{ref.get("name")}" to ' \
               f'{_describe_subject(subject, namespace)}'
    return f'ClusterRoleBinding "{name}" of {ref.get("kind")} "{ref.get("name")}" to {_describe_subject(subject, "")}'
