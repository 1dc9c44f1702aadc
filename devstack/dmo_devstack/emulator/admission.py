"""
Mutating admission webhooks, called as kube-apiserver's MutatingAdmissionWebhook plugin
calls them.

``admissionregistration.k8s.io/v1`` ``MutatingWebhookConfiguration`` is a built-in kind
served like the others (discovery, list/get/create/patch/delete, kubectl). On a write
the server orders it as kube-apiserver does: defaulting, **mutating admission**, then
validation and storage. For CREATE (POST) and UPDATE (PUT/PATCH, the main resource and
``/status``) the server calls, one after the other, every webhook whose ``rules`` match
(``apiGroups``, ``apiVersions``, ``operations``, ``resources`` with ``*``, ``*/*``,
``res/*``, ``*/sub`` and subresources, ``scope``), whose ``namespaceSelector`` matches
the namespace's labels (a Namespace's own labels for namespaces; cluster-scoped objects
always match) and whose ``objectSelector`` matches the labels of the object or of the
old object; configurations in the order of their names, webhooks in their order. Each
webhook gets an ``admission.k8s.io/v1`` AdmissionReview (``v1beta1`` when that is the
first version it lists), posted over HTTPS to ``clientConfig.url`` or to the Service
``clientConfig.service`` (its clusterIP and the Service port, as kube-apiserver dials
it: the stack's kubelet proxies ``clusterIP:port`` to a pod's ``targetPort`` as
kube-proxy does; the certificate is checked for
``<name>.<namespace>.svc``), with ``?timeout=<n>s``, verified against ``caBundle`` (the
machine's roots without one), bounded by ``timeoutSeconds``. A ``JSONPatch`` response is
applied (the emulator's JSON patch code), and the next webhook sees the patched object.
The webhooks are called outside the server's lock; an update whose object changed
meanwhile is redone, webhooks included, as GuaranteedUpdate does.

Messages, from kube-apiserver's source (staging/src/k8s.io/apiserver/pkg/admission/
plugin/webhook: ``mutating/dispatcher.go``, ``errors/statuserror.go``,
``request/admissionreview.go``; pkg/apis/admissionregistration/validation):

- denied: the webhook's ``status`` with code 400 when below 400 and the message
  ``admission webhook "<name>" denied the request: <message>`` (or its reason, or
  ``without explanation``);
- a failed call under ``failurePolicy: Fail`` (the default): 500 InternalError,
  ``Internal error occurred: failed calling webhook "<name>": failed to call webhook:
  Post "<url>?timeout=10s": <reason>``; an invalid response ``...: received invalid
  webhook response: <why>`` (``webhook response was absent``, ``expected response.uid=...``,
  ``expected webhook response of admission.k8s.io/v1, Kind=AdmissionReview, got ...``,
  ``webhook returned response.patch but not response.patchType`` and the converse),
  ``received undecodable patch in webhook response: ...``, ``unsupported patch type
  "<t>"``; under ``Ignore`` the request goes on unpatched and the server logs
  ``Failed calling webhook, failing open <name>: <error>``;
- a patch that does not apply: 500 ``Internal error occurred: <error>`` whatever the
  failure policy (the error text is python-jsonpatch's, not Go's);
- dry run with side effects: 400 ``admission webhook "<name>" does not support dry run``;
- creating or updating a configuration: ``webhooks[i].name`` ``should be a domain with at
  least three segments separated by dots``, ``Duplicate value``; ``sideEffects``
  ``Required value: must specify one of None, NoneOnDryRun`` or ``Unsupported value``;
  ``admissionReviewVersions`` ``Required value: must specify one of v1, v1beta1``,
  ``must include at least one of v1, v1beta1``, ``duplicate version``; ``timeoutSeconds``
  ``the timeout value must be between 1 and 30 seconds``; ``clientConfig`` ``Required
  value: exactly one of url or service is required``, a URL ``'https' is the only allowed
  URL scheme; desired format: https://host[/path]`` (and host, user, fragment, query);
  the enums of ``failurePolicy``, ``matchPolicy``, ``reinvocationPolicy``, rule
  ``operations`` and ``scope``; and the v1 defaults (``failurePolicy: Fail``,
  ``matchPolicy: Equivalent``, empty selectors, ``timeoutSeconds: 10``,
  ``reinvocationPolicy: Never``, rule ``scope: "*"``, service ``port: 443``).

Client credentials, as kube-apiserver's ``--admission-control-config-file``: an
``AdmissionConfiguration`` (``apiserver.config.k8s.io/v1``, or ``apiserver.k8s.io/v1alpha1``)
whose ``MutatingAdmissionWebhook`` plugin has a ``WebhookAdmission`` configuration (inline
or in the file ``path`` names) with an absolute ``kubeConfigFile``. The kubeconfig's user
for a webhook is picked as AuthenticationInfoResolver picks it (apiserver/pkg/util/webhook/
authentication.go): the exact ``host:port`` (``<service>.<namespace>.svc:<port>`` for a
Service, the URL's host and port, 443 when it has none), then ``*.``-prefixed suffixes of
it, both again without the port when it is 443, then ``*``, then the current context's
user; none: anonymous. Its ``client-certificate``/``client-key`` (or ``-data``) are
presented in the TLS handshake, a ``token``/``tokenFile`` as a bearer token, ``username``/
``password`` as basic auth. Unlike kube-apiserver, the kubeconfig is read again whenever
it changes, and a missing one means no credentials (kube-apiserver refuses to start):
the stack's tests turn client certificates on and off without a restart.

Approximated (Go's own texts not reproduced): the ``<reason>`` of a failed call is Go's
form for the common cases (``dial tcp <ip>:<port>: connect: connection refused``,
``context deadline exceeded``, ``tls: failed to verify certificate: x509: certificate
signed by unknown authority``; a host name mismatch says ``x509: certificate is not valid
for <host>`` without the certificate's names), a non-200 answer that is not a Status
``the server responded with the status code <n> but did not return more information``,
an unreadable ``caBundle`` ``could not get REST client: unable to load root certificates:
unable to parse bytes as PEM block``; a Service that does not exist ``service "<name>"
not found``; the selector operator check of configurations; ``userInfo`` is
``system:unsecured`` in ``system:masters`` (there is no authentication here).

Not emulated: validating webhooks (ValidatingWebhookConfiguration is stored, never
called), ``reinvocationPolicy: IfNeeded`` (stored, never reinvoked), ``matchPolicy:
Equivalent`` (only the served version exists here, so it matches as Exact does),
``matchConditions`` (CEL: webhooks are called as if they matched), DELETE and CONNECT
operations, ``/scale`` updates, the ``kubernetes.io/metadata.name`` namespace label, the
request's overall deadline. Webhook configurations themselves are never sent to
webhooks, as in Kubernetes.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import json
import logging
import os
import ssl
import tempfile
import urllib.parse
import uuid
from collections.abc import Mapping
from typing import Any

import aiohttp
import jsonpatch
import kmock
import yaml

from .builtin import builtin_defaults, write_defaults
from .errors import ApiError, FieldError, go_repr
from .meta import dns1123_subdomain_errors
from .resources import NAMESPACES, ResourceType, Target
from .selectors import LabelRequirement

logger = logging.getLogger(__name__)

GROUP = 'admissionregistration.k8s.io'
MUTATING_WEBHOOKS = kmock.resource(GROUP, 'v1', 'mutatingwebhookconfigurations')
#: Never sent to webhooks (IsExemptAdmissionConfigurationResource): they could lock themselves out.
_EXEMPT = {'mutatingwebhookconfigurations', 'validatingwebhookconfigurations', 'validatingadmissionpolicies',
           'validatingadmissionpolicybindings', 'mutatingadmissionpolicies', 'mutatingadmissionpolicybindings'}
_REVIEW_VERSIONS = ('v1', 'v1beta1')
_NO_SIDE_EFFECTS = ('None', 'NoneOnDryRun')
_OPERATIONS = ('*', 'CONNECT', 'CREATE', 'DELETE', 'UPDATE')  # sets.List: sorted
_SCOPES = ('*', 'Cluster', 'Namespaced')
_SELECTOR_OPERATORS = ('In', 'NotIn', 'Exists', 'DoesNotExist')
_URL_FORM = '; desired format: https://host[/path]'
#: Who makes every request: there is no authentication (the old insecure port's user).
USER_INFO = {'username': 'system:unsecured', 'groups': ['system:masters', 'system:authenticated']}


# --------------------------------------------------------------------------- the configuration kind

def configuration_defaults(obj: dict[str, Any]) -> None:
    """SetDefaults_MutatingWebhook and friends (admissionregistration/v1)."""
    for hook in obj.get('webhooks') or []:
        if not isinstance(hook, dict):
            continue
        for key, value in (('failurePolicy', 'Fail'), ('matchPolicy', 'Equivalent'), ('namespaceSelector', {}),
                           ('objectSelector', {}), ('timeoutSeconds', 10), ('reinvocationPolicy', 'Never')):
            hook.setdefault(key, value)
        for rule in hook.get('rules') or []:
            if isinstance(rule, dict):
                rule.setdefault('scope', '*')
        service = (hook.get('clientConfig') or {}).get('service')
        if isinstance(service, dict):
            service.setdefault('port', 443)


def configuration_errors(obj: Mapping[str, Any], schema_errors: list[FieldError]) -> list[FieldError]:
    """ValidateMutatingWebhookConfiguration; the OpenAPI ``required`` errors it words itself
    (name, clientConfig, sideEffects, admissionReviewVersions) give way to its own."""
    hooks = [h for h in obj.get('webhooks') or [] if isinstance(h, Mapping)]
    covered = {f'webhooks[{i}].{k}' for i in range(len(hooks))
               for k in ('name', 'clientConfig', 'sideEffects', 'admissionReviewVersions')}
    errors: list[FieldError] = []
    for e in schema_errors:
        if not (e.type == 'FieldValueRequired' and e.path in covered) and e not in errors:
            errors.append(e)
    names: set[str] = set()
    for i, hook in enumerate(hooks):
        path = f'webhooks[{i}]'
        errors += _hook_errors(hook, path)
        errors += _review_version_errors(hook.get('admissionReviewVersions'), f'{path}.admissionReviewVersions')
        name = hook.get('name')
        if name:
            if name in names:
                errors.append(FieldError(f'{path}.name', 'FieldValueDuplicate', f'Duplicate value: {go_repr(name)}'))
            names.add(name)
    return errors


def _required(path: str, detail: str = '') -> FieldError:
    return FieldError(path, 'FieldValueRequired', f'Required value: {detail}' if detail else 'Required value')


def _invalid(path: str, value: Any, detail: str) -> FieldError:
    return FieldError(path, 'FieldValueInvalid', f'Invalid value: {go_repr(value)}: {detail}')


def _not_supported(path: str, value: Any, supported: tuple[str, ...]) -> FieldError:
    values = ', '.join(go_repr(v) for v in supported)
    return FieldError(path, 'FieldValueNotSupported', f'Unsupported value: {go_repr(value)}: supported values: {values}')


def _enum(hook: Mapping[str, Any], key: str, supported: tuple[str, ...], path: str) -> list[FieldError]:
    value = hook.get(key)
    return [] if value is None or value in supported else [_not_supported(f'{path}.{key}', value, supported)]


def _hook_errors(hook: Mapping[str, Any], path: str) -> list[FieldError]:
    errors = []
    name = hook.get('name') or ''
    if not name:  # IsFullyQualifiedName
        errors.append(_required(f'{path}.name'))
    elif messages := dns1123_subdomain_errors(name):
        errors.append(_invalid(f'{path}.name', name, ','.join(messages)))
    elif len(name.split('.')) < 3:
        errors.append(_invalid(f'{path}.name', name, 'should be a domain with at least three segments separated by dots'))
    for j, rule in enumerate(hook.get('rules') or []):
        errors += _rule_errors(rule, f'{path}.rules[{j}]')
    errors += _enum(hook, 'failurePolicy', ('Fail', 'Ignore'), path)
    errors += _enum(hook, 'matchPolicy', ('Equivalent', 'Exact'), path)
    if hook.get('sideEffects') is None:
        errors.append(_required(f'{path}.sideEffects', f'must specify one of {", ".join(_NO_SIDE_EFFECTS)}'))
    else:
        errors += _enum(hook, 'sideEffects', _NO_SIDE_EFFECTS, path)
    timeout = hook.get('timeoutSeconds')
    if isinstance(timeout, int) and not 1 <= timeout <= 30:
        errors.append(_invalid(f'{path}.timeoutSeconds', timeout, 'the timeout value must be between 1 and 30 seconds'))
    for key in ('namespaceSelector', 'objectSelector'):
        for k, expr in enumerate((hook.get(key) or {}).get('matchExpressions') or []):
            op = expr.get('operator') if isinstance(expr, Mapping) else None
            if op not in _SELECTOR_OPERATORS:
                errors.append(_invalid(f'{path}.{key}.matchExpressions[{k}].operator', op, 'not a valid selector operator'))
    errors += _enum(hook, 'reinvocationPolicy', ('IfNeeded', 'Never'), path)
    return errors + _client_config_errors(hook.get('clientConfig') or {}, f'{path}.clientConfig')


def _rule_errors(rule: Mapping[str, Any], path: str) -> list[FieldError]:
    errors = []
    operations = rule.get('operations') or []
    if not operations:
        errors.append(_required(f'{path}.operations'))
    if len(operations) > 1 and '*' in operations:
        errors.append(_invalid(f'{path}.operations', operations, "if '*' is present, must not specify other operations"))
    for i, op in enumerate(operations):
        if op not in _OPERATIONS:
            errors.append(_not_supported(f'{path}.operations[{i}]', op, _OPERATIONS))
    for key in ('apiGroups', 'apiVersions', 'resources'):
        if not rule.get(key):
            errors.append(_required(f'{path}.{key}'))
    return errors + _enum(rule, 'scope', _SCOPES, path)


def _client_config_errors(cc: Mapping[str, Any], path: str) -> list[FieldError]:
    url, service = cc.get('url'), cc.get('service')
    if (url is None) == (service is None):
        return [_required(path, 'exactly one of url or service is required')]
    errors = []
    if url is not None:  # ValidateWebhookURL(forceHttps=true)
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != 'https':
            errors.append(_invalid(f'{path}.url', parts.scheme, "'https' is the only allowed URL scheme" + _URL_FORM))
        if not parts.hostname:
            errors.append(_invalid(f'{path}.url', parts.hostname or '', 'host must be specified' + _URL_FORM))
        if parts.username is not None:
            errors.append(_invalid(f'{path}.url', parts.netloc.rsplit('@', 1)[0],
                                   'user information is not permitted in the URL'))
        if parts.fragment:
            errors.append(_invalid(f'{path}.url', parts.fragment, 'fragments are not permitted in the URL'))
        if parts.query:
            errors.append(_invalid(f'{path}.url', parts.query, 'query parameters are not permitted in the URL'))
        return errors
    if not service.get('name'):
        errors.append(_required(f'{path}.service.name', 'service name is required'))
    if not service.get('namespace'):
        errors.append(_required(f'{path}.service.namespace', 'service namespace is required'))
    port = service.get('port', 443)
    if not isinstance(port, int) or not 1 <= port <= 65535:
        errors.append(_invalid(f'{path}.service.port', port, 'port is not valid: must be between 1 and 65535, inclusive'))
    svc_path = service.get('path')
    if svc_path and svc_path != '/' and not svc_path.startswith('/'):
        errors.append(_invalid(f'{path}.service.path', svc_path, "must start with a '/'"))
    return errors


def _review_version_errors(versions: Any, path: str) -> list[FieldError]:
    if not versions:
        return [_required(path, f'must specify one of {", ".join(_REVIEW_VERSIONS)}')]
    errors, seen = [], set()
    for i, version in enumerate(versions):
        if version in seen:
            errors.append(_invalid(f'{path}[{i}]', version, 'duplicate version'))
        seen.add(version)
    if not seen & set(_REVIEW_VERSIONS):
        errors.append(_invalid(path, versions, f'must include at least one of {", ".join(_REVIEW_VERSIONS)}'))
    return errors


# --------------------------------------------------------------------------- matching

def _rule_matches(rule: Mapping[str, Any], rtype: ResourceType, operation: str, subresource: str | None,
                  namespace: str) -> bool:
    """rules.Matcher: operation, group, version, resource (with subresource), scope."""
    def has(key: str, value: str) -> bool:
        values = rule.get(key) or []
        return '*' in values or value in values
    if not (has('operations', operation) and has('apiGroups', rtype.group) and has('apiVersions', rtype.version)):
        return False
    wanted = f'{rtype.plural}/{subresource}' if subresource else rtype.plural
    for res in rule.get('resources') or []:
        if res in ('*/*', wanted) or (res == '*' and not subresource):
            break
        head, _, tail = res.partition('/')
        if subresource and ((head == rtype.plural and tail == '*') or (head == '*' and tail == subresource)):
            break
    else:
        return False
    scope = rule.get('scope', '*')
    is_namespace = rtype.resource == NAMESPACES
    if scope == 'Namespaced':
        return not is_namespace and bool(namespace)
    if scope == 'Cluster':
        return is_namespace or not namespace
    return True


def _selector_matches(selector: Mapping[str, Any] | None, obj: Mapping[str, Any] | None) -> bool:
    if obj is None:
        return False
    labels = (obj.get('metadata') or {}).get('labels') or {}
    return all(r.matches(labels) for r in LabelRequirement.from_selector(selector or {}))


class _CallFailed(Exception):
    """ErrCallingWebhook: what ``failurePolicy`` decides on."""


# --------------------------------------------------------------------------- client credentials

_ADMISSION_CONFIG_VERSIONS = ('apiserver.config.k8s.io/v1', 'apiserver.k8s.io/v1alpha1')
_WEBHOOK_ADMISSION_VERSIONS = ('apiserver.config.k8s.io/v1', 'apiserver.config.k8s.io/v1alpha1')


def webhook_kubeconfig_path(config_file: str | os.PathLike[str], plugin: str = 'MutatingAdmissionWebhook') -> str | None:
    """The ``kubeConfigFile`` an AdmissionConfiguration gives ``plugin`` (None: none);
    ValueError for a file kube-apiserver would refuse."""
    with open(config_file, encoding='utf-8') as f:
        doc = yaml.safe_load(f) or {}
    if doc.get('kind') != 'AdmissionConfiguration' or doc.get('apiVersion') not in _ADMISSION_CONFIG_VERSIONS:
        raise ValueError(f'{config_file}: not an AdmissionConfiguration')
    for entry in doc.get('plugins') or ():
        if not isinstance(entry, dict) or entry.get('name') != plugin:
            continue
        configuration = entry.get('configuration')
        if configuration is None and entry.get('path'):
            with open(os.path.join(os.path.dirname(os.fspath(config_file)), entry['path']), encoding='utf-8') as f:
                configuration = yaml.safe_load(f)
        if not isinstance(configuration, dict) or configuration.get('kind') != 'WebhookAdmission' \
                or configuration.get('apiVersion') not in _WEBHOOK_ADMISSION_VERSIONS:
            raise ValueError(f'{config_file}: plugin {plugin}: not a WebhookAdmission configuration')
        path = configuration.get('kubeConfigFile') or ''
        if not os.path.isabs(path):  # webhookadmission's LoadConfig
            raise ValueError(f'{config_file}: kubeConfigFile: must be an absolute file path')
        return path
    return None


def resolve_webhook_user(kubeconfig: Mapping[str, Any], target: str) -> dict[str, Any]:
    """defaultAuthenticationInfoResolver.clientConfig: the kubeconfig user for ``host:port``
    (``{}``: anonymous)."""
    users = {u['name']: u.get('user') or {} for u in kubeconfig.get('users') or ()
             if isinstance(u, dict) and isinstance(u.get('name'), str)}

    def lookup(name: str) -> dict[str, Any] | None:
        if name in users:
            return users[name]
        steps = name.split('.')
        return next((users[f'*.{".".join(steps[i:])}'] for i in range(1, len(steps))
                     if f'*.{".".join(steps[i:])}' in users), None)

    found = lookup(target)
    host, _, port = target.rpartition(':')
    if found is None and port == '443':
        found = lookup(host)
    if found is None:
        found = users.get('*')
    if found is None:
        context = next((c.get('context') or {} for c in kubeconfig.get('contexts') or ()
                        if isinstance(c, dict) and c.get('name') == kubeconfig.get('current-context')), {})
        found = users.get(context.get('user') or '')
    return found or {}


class _WebhookCredentials:
    """The kubeconfig of the AdmissionConfiguration, read again when it changes."""

    def __init__(self, config_file: str | os.PathLike[str]) -> None:
        self.kubeconfig_path = webhook_kubeconfig_path(config_file)
        self._stamp: tuple[int, int] | None = None
        self._kubeconfig: dict[str, Any] = {}

    def kubeconfig(self) -> dict[str, Any]:
        if self.kubeconfig_path is None:
            return {}
        stamp = _stamp(self.kubeconfig_path)
        if stamp is None:
            self._stamp, self._kubeconfig = None, {}
            return {}
        if stamp != self._stamp:
            with open(self.kubeconfig_path, encoding='utf-8') as f:
                self._kubeconfig = yaml.safe_load(f) or {}
            self._stamp = stamp
        return self._kubeconfig


def _load_client_certificate(user: Mapping[str, Any], context: ssl.SSLContext) -> None:
    """Put a kubeconfig user's client certificate on the TLS context."""
    cert, key = user.get('client-certificate'), user.get('client-key')
    cert_data, key_data = user.get('client-certificate-data'), user.get('client-key-data')
    if cert_data or key_data:
        with tempfile.TemporaryDirectory(prefix='webhook-client-') as folder:
            cert, key = os.path.join(folder, 'tls.crt'), os.path.join(folder, 'tls.key')
            with open(cert, 'wb') as f:
                f.write(base64.b64decode(cert_data or ''))
            with open(key, 'wb') as f:
                f.write(base64.b64decode(key_data or ''))
            context.load_cert_chain(cert, key)
    elif cert or key:
        context.load_cert_chain(cert or '', key or '')


def _stamp(path: Any) -> tuple[int, int] | None:
    """A file's (mtime, size): a rotated client certificate is loaded anew."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size) if st else None


def _present_headers(user: Mapping[str, Any], headers: dict[str, str]) -> None:
    """A kubeconfig user's token or basic credentials, as headers."""
    token = user.get('token')
    if not token and user.get('tokenFile'):
        with open(user['tokenFile'], encoding='utf-8') as f:
            token = f.read().strip()
    if token:
        headers['Authorization'] = f'Bearer {token}'
    elif user.get('username') or user.get('password'):
        basic = base64.b64encode(f'{user.get("username") or ""}:{user.get("password") or ""}'.encode()).decode()
        headers['Authorization'] = f'Basic {basic}'


# --------------------------------------------------------------------------- the mixin

class Admission:
    """Mutating admission webhooks (a mixin of ``KubeEmulator``)."""

    #: kube-apiserver's ``--admission-control-config-file`` (client credentials for webhooks)
    _webhook_credentials: _WebhookCredentials | None = None
    #: TLS contexts by (caBundle, client credentials and their files' stamps)
    _webhook_contexts: dict[tuple[Any, str], ssl.SSLContext]

    def configure_admission(self, config_file: str | os.PathLike[str] | None) -> None:
        """Read an AdmissionConfiguration (``--admission-control-config-file``); None: no
        client credentials. ValueError when kube-apiserver would refuse it."""
        self._webhook_credentials = _WebhookCredentials(config_file) if config_file else None
        self._webhook_contexts = {}

    def _mutating_hooks(self, rtype: ResourceType, operation: str, subresource: str | None,
                        namespace: str) -> list[dict[str, Any]]:
        """The webhooks whose rules match, configurations in name order."""
        if rtype.group == GROUP and rtype.plural in _EXEMPT:
            return []
        configs = sorted((obj for _, obj in self._live_items(self._types[GROUP, 'v1', 'mutatingwebhookconfigurations'])),
                         key=lambda c: c['metadata']['name'])
        return [hook for config in configs for hook in config.get('webhooks') or []
                if any(_rule_matches(rule, rtype, operation, subresource, namespace) for rule in hook.get('rules') or [])]

    def _namespace_labels(self, rtype: ResourceType, namespace: str, obj: Mapping[str, Any]) -> dict[str, str] | None:
        """The labels a namespaceSelector sees; None: always matches (cluster-scoped objects)."""
        if rtype.resource == NAMESPACES:
            return (obj.get('metadata') or {}).get('labels') or {}
        if not namespace:
            return None
        ns = self._get_live(self._types['', 'v1', 'namespaces'], None, namespace)
        return ((ns or {}).get('metadata') or {}).get('labels') or {}

    async def _admit_create_webhooks(self, target: Target, body: Any,
                                     params: Mapping[str, str]) -> tuple[Any, list[str]]:
        """Mutating admission of a create: the body as the webhooks leave it, and their warnings.
        A body that creation refuses anyway is passed on untouched (the error comes from there)."""
        rtype = target.rtype
        if not isinstance(body, dict) or not isinstance(body.get('metadata', {}), dict):
            return body, []
        if body.get('apiVersion', rtype.api_version) != rtype.api_version or body.get('kind', rtype.kind) != rtype.kind:
            return body, []
        namespace = ''
        if rtype.namespaced:
            namespace = target.namespace or body.get('metadata', {}).get('namespace') or ''
            meta_ns = body.get('metadata', {}).get('namespace')
            if not namespace or (meta_ns and meta_ns != namespace) \
                    or self._get_live(self._types['', 'v1', 'namespaces'], None, namespace) is None:
                return body, []  # the NamespaceLifecycle plugin refuses it before any webhook
        if not self._mutating_hooks(rtype, 'CREATE', None, namespace):
            return body, []
        obj = copy.deepcopy(body)
        obj['apiVersion'], obj['kind'] = rtype.api_version, rtype.kind
        meta = obj.setdefault('metadata', {})
        if rtype.namespaced:
            meta['namespace'] = namespace  # EnsureObjectNamespaceMatchesRequestNamespace
        else:
            meta.pop('namespace', None)
        status = copy.deepcopy(obj.get('status'))  # the strategy resets it later, not the defaulting
        builtin_defaults(rtype, obj)
        write_defaults(rtype, obj)
        if status is None:
            obj.pop('status', None)
        else:
            obj['status'] = status
        options = {'kind': 'CreateOptions', 'apiVersion': 'meta.k8s.io/v1'}
        return await self._run_mutating_webhooks(target, 'CREATE', namespace, meta.get('name') or '', obj, None,
                                                 params, options)

    def _has_update_webhooks(self, target: Target) -> bool:
        return bool(self._mutating_hooks(target.rtype, 'UPDATE', target.subresource, target.namespace or ''))

    async def _update_with_webhooks(self, target: Target, body: Any, method: str, ctype: str,
                                    params: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
        """PUT or PATCH with mutating admission between the new state and its storage; redone
        when the object changed meanwhile (GuaranteedUpdate calls admission again)."""
        rtype = target.rtype
        assert target.name is not None
        kind = 'UpdateOptions' if method == 'PUT' else 'PatchOptions'
        for _ in range(20):
            async with self._lock:
                old = self._get_live(rtype, target.namespace, target.name)
                if old is None:
                    raise rtype.not_found(target.name)
                new = self._updated_object(target, old, body, method, ctype)
            if isinstance(new, dict) and isinstance(new.get('metadata', {}), dict):
                new = copy.deepcopy(new)
                new['apiVersion'], new['kind'] = old['apiVersion'], old['kind']
                new.setdefault('metadata', {}).setdefault('name', target.name)
                if rtype.namespaced:
                    new['metadata'].setdefault('namespace', target.namespace)
                write_defaults(rtype, new)
                new, warnings = await self._run_mutating_webhooks(
                    target, 'UPDATE', target.namespace or '', target.name, new, old, params,
                    {'kind': kind, 'apiVersion': 'meta.k8s.io/v1'})
            else:
                warnings = []
            async with self._lock:
                current = self._get_live(rtype, target.namespace, target.name)
                if current is None:
                    raise rtype.not_found(target.name)
                if current['metadata']['resourceVersion'] != old['metadata']['resourceVersion']:
                    continue
                obj, more = self._finish_write(target, current, new, params)
                return obj, warnings + more
        raise rtype.conflict(target.name)

    async def _run_mutating_webhooks(self, target: Target, operation: str, namespace: str, name: str,
                                     obj: dict[str, Any], old: dict[str, Any] | None, params: Mapping[str, str],
                                     options: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        rtype = target.rtype
        dry_run = params.get('dryRun') == 'All'
        if dry_run:
            options = {**options, 'dryRun': ['All']}
        if params.get('fieldManager'):
            options = {**options, 'fieldManager': params['fieldManager']}
        warnings: list[str] = []
        for hook in self._mutating_hooks(rtype, operation, target.subresource, namespace):
            ns_labels = self._namespace_labels(rtype, namespace, obj)
            if ns_labels is not None and not all(
                    r.matches(ns_labels) for r in LabelRequirement.from_selector(hook.get('namespaceSelector') or {})):
                continue
            selector = hook.get('objectSelector') or {}
            if not (_selector_matches(selector, obj) or _selector_matches(selector, old)):
                continue
            hook_name = hook['name']
            if dry_run and hook.get('sideEffects') not in _NO_SIDE_EFFECTS:
                raise ApiError(400, 'BadRequest', f'admission webhook "{hook_name}" does not support dry run')
            version = next((v for v in hook.get('admissionReviewVersions') or [] if v in _REVIEW_VERSIONS), 'v1')
            uid = str(uuid.uuid4())
            gvk = {'group': rtype.group, 'version': rtype.version, 'kind': rtype.kind}
            gvr = {'group': rtype.group, 'version': rtype.version, 'resource': rtype.plural}
            request: dict[str, Any] = {
                'uid': uid, 'kind': gvk, 'resource': gvr, 'requestKind': gvk, 'requestResource': gvr,
                'name': name, 'namespace': namespace, 'operation': operation, 'userInfo': copy.deepcopy(USER_INFO),
                'object': obj, 'oldObject': old, 'dryRun': dry_run, 'options': options}
            if target.subresource:
                request['subResource'] = request['requestSubResource'] = target.subresource
            review = {'kind': 'AdmissionReview', 'apiVersion': f'admission.k8s.io/{version}', 'request': request}
            try:
                response = await self._call_webhook(hook, review, version, uid)
            except _CallFailed as e:
                message = f'failed calling webhook "{hook_name}": {e}'
                if hook.get('failurePolicy', 'Fail') == 'Ignore':
                    logger.warning('Failed calling webhook, failing open %s: %s', hook_name, message)
                    continue
                logger.warning('Failed calling webhook, failing closed %s: %s', hook_name, message)
                raise ApiError(500, 'InternalError', f'Internal error occurred: {message}',
                               {'causes': [{'message': message}]}) from None
            warnings += [w for w in response.get('warnings') or [] if isinstance(w, str)]
            if not response.get('allowed'):
                raise _denied(hook_name, response.get('status'))
            if response.get('patch'):
                obj = self._apply_webhook_patch(rtype, hook, response, obj)
        return obj, warnings

    def _apply_webhook_patch(self, rtype: ResourceType, hook: Mapping[str, Any], response: Mapping[str, Any],
                             obj: dict[str, Any]) -> dict[str, Any]:
        hook_name = hook['name']
        try:
            patch = json.loads(base64.b64decode(response['patch'], validate=True))
            if not isinstance(patch, list):
                raise ValueError('a JSON patch is a list of operations')
        except (binascii.Error, ValueError, TypeError) as e:
            return self._patch_call_failed(hook, f'received undecodable patch in webhook response: {e}', obj)
        if not patch:
            return obj
        if response.get('patchType') != 'JSONPatch':
            return self._patch_call_failed(hook, f'unsupported patch type {json.dumps(response.get("patchType"))}', obj)
        try:
            patched = jsonpatch.JsonPatch(patch).apply(copy.deepcopy(obj))
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError) as e:
            raise ApiError(500, 'InternalError', f'Internal error occurred: {e}', {'causes': [{'message': str(e)}]})
        if not isinstance(patched, dict):
            raise ApiError(500, 'InternalError', 'Internal error occurred: the patched object is not an object')
        write_defaults(rtype, patched)  # the object is defaulted again after each patch
        logger.info('admission webhook %s patched %s', hook_name, rtype.qualified)
        return patched

    def _patch_call_failed(self, hook: Mapping[str, Any], reason: str, obj: dict[str, Any]) -> dict[str, Any]:
        message = f'failed calling webhook "{hook["name"]}": {reason}'
        if hook.get('failurePolicy', 'Fail') == 'Ignore':
            logger.warning('Failed calling webhook, failing open %s: %s', hook['name'], message)
            return obj
        raise ApiError(500, 'InternalError', f'Internal error occurred: {message}', {'causes': [{'message': message}]})

    # ------------------------------------------------------------- the call

    def _webhook_endpoint(self, cc: Mapping[str, Any], timeout: int) -> tuple[str, str, str, int, str]:
        """(URL as reported, connect host, TLS server name, port, path) of a clientConfig."""
        if cc.get('url'):
            parts = urllib.parse.urlsplit(cc['url'])
            port = parts.port or 443
            target = parts.path or '/'
            return f'{cc["url"]}?timeout={timeout}s', parts.hostname or '', parts.hostname or '', port, target
        svc = cc['service']
        name, namespace, port = svc['name'], svc['namespace'], svc.get('port', 443)
        host = f'{name}.{namespace}.svc'
        path = svc.get('path') or '/'
        url = f'https://{host}:{port}{path}?timeout={timeout}s'
        service = self._get_live(self._types['', 'v1', 'services'], namespace, name)
        if service is None:
            raise _CallFailed(f'failed to call webhook: Post "{url}": service "{name}" not found')
        ip = (service.get('spec') or {}).get('clusterIP')
        if not ip or ip == 'None':
            raise _CallFailed(f'failed to call webhook: Post "{url}": cannot route to service with ClusterIP None')
        entry = next((p for p in (service.get('spec') or {}).get('ports') or [] if p.get('port') == port), None)
        if entry is None:
            raise _CallFailed(f'failed to call webhook: Post "{url}": no service port {port} found for service "{name}"')
        return url, ip, host, port, path

    async def _call_webhook(self, hook: Mapping[str, Any], review: dict[str, Any], version: str,
                            uid: str) -> dict[str, Any]:
        """POST the review; the verified response, or _CallFailed with ErrCallingWebhook's reason."""
        cc = hook.get('clientConfig') or {}
        timeout = int(hook.get('timeoutSeconds') or 10)
        url, host, server_name, port, path = self._webhook_endpoint(cc, timeout)
        headers = {'Content-Type': 'application/json', 'Accept': 'application/json',
                   'Host': urllib.parse.urlsplit(url).netloc}
        user: Mapping[str, Any] = {}
        if self._webhook_credentials is not None:
            # ClientConfigFor(host:port) / ClientConfigForService(name.ns.svc:port)
            target = (f'{cc["service"]["name"]}.{cc["service"]["namespace"]}.svc:{port}' if not cc.get('url')
                      else f'{"[" + server_name + "]" if ":" in server_name else server_name}:{port}')
            try:
                user = resolve_webhook_user(self._webhook_credentials.kubeconfig(), target) or {}
            except (OSError, ValueError) as e:
                raise _CallFailed(f'could not get REST client: {e}') from None
        # kube-apiserver keeps a REST client per webhook; building a TLS context (the
        # system roots, a client certificate) per call would cost 200 ms here
        stamps = [_stamp(user.get(k)) for k in ('client-certificate', 'client-key')]
        key = (cc.get('caBundle'), json.dumps([user, stamps], sort_keys=True, default=str))
        if not hasattr(self, '_webhook_contexts'):
            self._webhook_contexts = {}
        context = self._webhook_contexts.get(key)
        if context is None:
            try:
                if cc.get('caBundle'):
                    context = ssl.create_default_context(cadata=base64.b64decode(cc['caBundle'], validate=True).decode())
                else:
                    context = ssl.create_default_context()
            except (binascii.Error, ValueError, ssl.SSLError):
                raise _CallFailed('could not get REST client: unable to load root certificates: '
                                  'unable to parse bytes as PEM block') from None
            try:
                _load_client_certificate(user, context)
            except (OSError, ValueError, ssl.SSLError, binascii.Error) as e:
                raise _CallFailed(f'could not get REST client: {e}') from None
            if len(self._webhook_contexts) >= 64:
                self._webhook_contexts.clear()
            self._webhook_contexts[key] = context
        try:
            _present_headers(user, headers)
        except (OSError, ValueError) as e:
            raise _CallFailed(f'could not get REST client: {e}') from None
        address = f'[{host}]' if ':' in host else host
        post = f'https://{address}:{port}{path}?timeout={timeout}s'
        data = json.dumps(review).encode()
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                             timeout=aiohttp.ClientTimeout(total=timeout)) as session:
                async with session.post(post, data=data, ssl=context, server_hostname=server_name,
                                        headers=headers) as resp:
                    status, text = resp.status, await resp.text()
        except asyncio.TimeoutError:
            raise _CallFailed(f'failed to call webhook: Post "{url}": context deadline exceeded') from None
        except aiohttp.ClientConnectorCertificateError as e:
            raise _CallFailed(f'failed to call webhook: Post "{url}": {_tls_reason(e.certificate_error, server_name)}') \
                from None
        except aiohttp.ClientSSLError as e:
            raise _CallFailed(f'failed to call webhook: Post "{url}": tls: {e}') from None
        except aiohttp.ClientConnectorError as e:
            reason = 'connect: connection refused' if isinstance(e.os_error, ConnectionRefusedError) else str(e.os_error)
            raise _CallFailed(f'failed to call webhook: Post "{url}": dial tcp {host}:{port}: {reason}') from None
        except aiohttp.ClientError as e:
            raise _CallFailed(f'failed to call webhook: Post "{url}": {e}') from None
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        if status != 200:
            if isinstance(answer, dict) and answer.get('kind') == 'Status' and answer.get('message'):
                reason = answer['message']
            else:
                reason = f'the server responded with the status code {status} but did not return more information'
            raise _CallFailed(f'failed to call webhook: {reason}')
        if not isinstance(answer, dict):
            raise _CallFailed(f'failed to call webhook: couldn\'t get version/kind; json parse error: {text[:200]!r}')
        return _verified_response(answer, version, uid)


def _tls_reason(error: Exception, server_name: str) -> str:
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_code == 62:  # hostname mismatch
        return f'tls: failed to verify certificate: x509: certificate is not valid for {server_name}'
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_code in (2, 18, 19, 20, 21):
        return 'tls: failed to verify certificate: x509: certificate signed by unknown authority'
    return f'tls: failed to verify certificate: {error}'


def _verified_response(review: Mapping[str, Any], version: str, uid: str) -> dict[str, Any]:
    """VerifyAdmissionResponse (mutating)."""
    def invalid(why: str) -> _CallFailed:
        return _CallFailed(f'received invalid webhook response: {why}')
    response = review.get('response')
    if not isinstance(response, dict):
        raise invalid('webhook response was absent')
    if response.get('uid') != uid:
        raise invalid(f'expected response.uid="{uid}", got "{response.get("uid") or ""}"')
    expected = f'admission.k8s.io/{version}'
    if version == 'v1' and (review.get('apiVersion') != expected or review.get('kind') != 'AdmissionReview'):
        got_group, _, got_version = (review.get('apiVersion') or '').rpartition('/')
        got = f'{got_group}/{got_version}' if got_group else got_version
        raise invalid(f'expected webhook response of {expected}, Kind=AdmissionReview, '
                      f'got {got}, Kind={review.get("kind") or ""}')
    response = dict(response)
    if version == 'v1beta1' and response.get('patch') and 'patchType' not in response:
        response['patchType'] = 'JSONPatch'  # v1beta1 reviews may leave it out
    if response.get('patch') and response.get('patchType') is None:
        raise invalid('webhook returned response.patch but not response.patchType')
    if not response.get('patch') and response.get('patchType') is not None:
        raise invalid('webhook returned response.patchType but not response.patch')
    if response.get('patchType') == '':
        raise invalid('webhook returned invalid response.patchType of ""')
    return response


def _denied(hook_name: str, result: Any) -> ApiError:
    """ToStatusErr: the webhook's Status, a 4xx or 5xx, with the denial in its message."""
    result = dict(result) if isinstance(result, Mapping) else {}
    code = result.get('code') if isinstance(result.get('code'), int) else 0
    denied = f'admission webhook "{hook_name}" denied the request'
    if result.get('message'):
        message = f'{denied}: {result["message"]}'
    elif result.get('reason'):
        message = f'{denied}: {result["reason"]}'
    else:
        message = f'{denied} without explanation'
    details = result.get('details') if isinstance(result.get('details'), dict) else None
    return ApiError(max(code, 400), str(result.get('reason') or ''), message, details)
