"""
Built-in kinds: their defaults, immutable pod specs, and the validation rules of the
API server's code for pods, services, workloads and events.

Each write of a built-in kind is checked twice, as kube-apiserver does it: against
its OpenAPI schema (``builtin_schema``: types, required fields), then by the rules
here, which the schema cannot say (port numbers and IANA port names, DNS-1123
container names, a workload's selector matching its template...), with the messages
of apimachinery's validators. Only the rules that matter to the clients here are
written out; the rest of kube-apiserver's validation is not emulated.
"""
from __future__ import annotations

import base64
import copy
import re
from collections.abc import Mapping
from typing import Any

from .errors import FieldError, go_repr
from .meta import dns1123_label_errors, invalid
from .resources import BUILTIN_SCALE, CONFIGMAPS, EVENTS, NAMESPACES, PODS, SECRETS, SERVICES, ResourceType
from .selectors import LabelRequirement

# What a pod update may change in spec (the API server forbids the rest).
POD_MUTABLE = ('containers[*].image', 'initContainers[*].image', 'activeDeadlineSeconds', 'tolerations')


def check_pod_update(rtype: ResourceType, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Pod specs are immutable but for images, activeDeadlineSeconds and tolerations."""
    def masked(spec: Any) -> Any:
        spec = copy.deepcopy(spec or {})
        for key in ('containers', 'initContainers'):
            for container in spec.get(key) or []:
                container.pop('image', None)
        spec.pop('activeDeadlineSeconds', None)
        spec.pop('tolerations', None)
        return spec
    if masked(old.get('spec')) != masked(new.get('spec')):
        fields = ','.join(f'`spec.{f}`' for f in POD_MUTABLE)
        raise rtype.invalid(old['metadata']['name'], [FieldError(
            'spec', 'FieldValueForbidden', f'Forbidden: pod updates may not change fields other than {fields}')])


def builtin_defaults(rtype: ResourceType, obj: dict[str, Any]) -> None:
    """The few built-in defaults and initial statuses that clients here read."""
    if rtype.resource == NAMESPACES:
        obj.setdefault('spec', {}).setdefault('finalizers', ['kubernetes'])
        obj['status'] = {'phase': 'Active'}
    elif rtype.resource == PODS:
        spec = obj.setdefault('spec', {})
        spec.setdefault('restartPolicy', 'Always')
        spec.setdefault('terminationGracePeriodSeconds', 30)
        spec.setdefault('dnsPolicy', 'ClusterFirst')
        obj['status'] = {'phase': 'Pending'}
    elif (rtype.group, rtype.plural) in BUILTIN_SCALE:
        obj.setdefault('spec', {}).setdefault('replicas', 1)



def write_defaults(rtype: ResourceType, obj: dict[str, Any]) -> None:
    """Defaults the API server applies on every write that its validation relies on:
    container port protocols, ``restartPolicy`` of workload pod templates, and a
    Secret's ``type`` (``Opaque``) and ``stringData`` (merged into ``data``, never stored:
    the conversion to the internal type does it)."""
    if rtype.resource == SECRETS:
        _secret_defaults(obj)
    elif rtype.resource == PODS:
        _default_pod_spec(obj.get('spec'))
    elif (rtype.group, rtype.plural) in _WORKLOADS:
        template = (obj.get('spec') or {}).get('template')
        if isinstance(template, dict) and isinstance(template.get('spec'), dict):
            template['spec'].setdefault('restartPolicy', 'Always')
            _default_pod_spec(template['spec'])


def _secret_defaults(obj: dict[str, Any]) -> None:
    if not obj.get('type'):
        obj['type'] = 'Opaque'
    string_data = obj.get('stringData')
    if string_data is None or not isinstance(string_data, dict) or not isinstance(obj.get('data', {}), dict) \
            or not all(isinstance(v, str) for v in string_data.values()):
        return  # absent, or a wrong type: the schema check answers the decoder's 400
    del obj['stringData']
    if string_data:
        data = obj.setdefault('data', {})
        for key, value in string_data.items():
            data[key] = base64.b64encode(value.encode()).decode()


def _default_pod_spec(spec: Any) -> None:
    if not isinstance(spec, dict):
        return
    for key in ('containers', 'initContainers'):
        for container in spec.get(key) or []:
            for port in (container.get('ports') or []) if isinstance(container, dict) else []:
                if isinstance(port, dict):
                    port.setdefault('protocol', 'TCP')


_IMMUTABLE = 'Forbidden: field is immutable when `immutable` is set'


def check_builtin_update(rtype: ResourceType, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[FieldError]:
    """ValidateSecretUpdate and ValidateConfigMapUpdate: a Secret's ``type`` never
    changes; with ``immutable: true`` the data and the flag itself are fixed."""
    if rtype.resource not in (SECRETS, CONFIGMAPS):
        return []
    errors = []
    if rtype.resource == SECRETS and new.get('type') != old.get('type'):
        errors.append(FieldError('type', 'FieldValueInvalid',
                                 f'Invalid value: {go_repr(new.get("type"))}: field is immutable'))
    if old.get('immutable') is True:
        if new.get('immutable') is not True:
            errors.append(FieldError('immutable', 'FieldValueForbidden', _IMMUTABLE))
        # reflect.DeepEqual: an absent map (nil) differs from an empty one
        for key in ('data',) if rtype.resource == SECRETS else ('data', 'binaryData'):
            if new.get(key) != old.get(key) or (key in new) != (key in old):
                errors.append(FieldError(key, 'FieldValueForbidden', _IMMUTABLE))
    return errors


def check_builtin(rtype: ResourceType, obj: dict[str, Any]) -> list[FieldError]:
    """The rules of the API server's validation code (pkg/apis/*/validation) that matter here."""
    spec = obj.get('spec') or {}
    if rtype.resource == PODS:
        return pod_spec_errors(spec, 'spec', ('Always', 'Never', 'OnFailure'))
    if rtype.resource == SERVICES:
        return service_errors(spec)
    if (rtype.group, rtype.plural) in _WORKLOADS:
        return workload_errors(spec)
    if rtype.resource == EVENTS:
        return event_errors(obj)
    return []


# --------------------------------------------------------------------------- pods

_PROTOCOLS = ('SCTP', 'TCP', 'UDP')  # sets.List: sorted


def pod_spec_errors(spec: Mapping[str, Any], path: str, restart_policies: tuple[str, ...]) -> list[FieldError]:
    errors = []
    names: set[str] = set()
    for key in ('initContainers', 'containers'):
        for i, container in enumerate(spec.get(key) or []):
            errors += _container_errors(container, f'{path}.{key}[{i}]', names)
    policy = spec.get('restartPolicy')
    if policy is not None and policy not in restart_policies:
        errors.append(_not_supported(f'{path}.restartPolicy', policy, restart_policies))
    return errors


def _container_errors(container: Mapping[str, Any], path: str, names: set[str]) -> list[FieldError]:
    name = container.get('name') or ''
    errors = invalid(f'{path}.name', name, dns1123_label_errors(name)) if name else []
    if name in names:
        errors.append(FieldError(f'{path}.name', 'FieldValueDuplicate', f'Duplicate value: {go_repr(name)}'))
    names.add(name)
    if not container.get('image'):
        errors.append(FieldError(f'{path}.image', 'FieldValueRequired', 'Required value'))
    port_names: set[str] = set()
    for i, port in enumerate(container.get('ports') or []):
        errors += _container_port_errors(port, f'{path}.ports[{i}]', port_names)
    return errors


def _container_port_errors(port: Mapping[str, Any], path: str, names: set[str]) -> list[FieldError]:
    errors = []
    if port.get('name'):
        messages = port_name_errors(port['name'])
        errors += invalid(f'{path}.name', port['name'], messages)
        if not messages and port['name'] in names:
            errors.append(FieldError(f'{path}.name', 'FieldValueDuplicate', f'Duplicate value: {go_repr(port["name"])}'))
        names.add(port['name'])
    if not port.get('containerPort'):
        errors.append(FieldError(f'{path}.containerPort', 'FieldValueRequired', 'Required value'))
    else:
        errors += invalid(f'{path}.containerPort', port['containerPort'], port_number_errors(port['containerPort']))
    if port.get('hostPort'):
        errors += invalid(f'{path}.hostPort', port['hostPort'], port_number_errors(port['hostPort']))
    return errors + _protocol_errors(port, path)


def _protocol_errors(port: Mapping[str, Any], path: str) -> list[FieldError]:
    protocol = port.get('protocol')
    if not protocol:
        return [FieldError(f'{path}.protocol', 'FieldValueRequired', 'Required value')]
    return [] if protocol in _PROTOCOLS else [_not_supported(f'{path}.protocol', protocol, _PROTOCOLS)]


def port_number_errors(port: int) -> list[str]:
    """validation.IsValidPortNum."""
    return [] if 1 <= port <= 65535 else ['must be between 1 and 65535, inclusive']


def port_name_errors(name: str) -> list[str]:
    """validation.IsValidPortName: an IANA_SVC_NAME."""
    errors = ['must be no more than 15 characters'] if len(name) > 15 else []
    if not re.fullmatch('[-a-z0-9]+', name):
        errors.append('must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)')
    if not re.search('[a-z]', name):
        errors.append('must contain at least one letter (a-z)')
    if '--' in name:
        errors.append('must not contain consecutive hyphens')
    if name.startswith('-') or name.endswith('-'):
        errors.append('must not begin or end with a hyphen')
    return errors


# --------------------------------------------------------------------------- services

_SERVICE_TYPES = ('ClusterIP', 'ExternalName', 'LoadBalancer', 'NodePort')


def service_errors(spec: Mapping[str, Any]) -> list[FieldError]:
    kind = spec.get('type', 'ClusterIP')
    errors = [] if kind in _SERVICE_TYPES else [_not_supported('spec.type', kind, _SERVICE_TYPES)]
    ports = spec.get('ports') or []
    if not ports and spec.get('clusterIP') != 'None' and kind != 'ExternalName':
        errors.append(FieldError('spec.ports', 'FieldValueRequired', 'Required value'))
    names: set[str] = set()
    for i, port in enumerate(ports):
        errors += _service_port_errors(port, f'spec.ports[{i}]', names, require_name=len(ports) > 1)
    return errors


def _service_port_errors(port: Mapping[str, Any], path: str, names: set[str], require_name: bool) -> list[FieldError]:
    errors = []
    name = port.get('name') or ''
    if require_name and not name:
        errors.append(FieldError(f'{path}.name', 'FieldValueRequired', 'Required value'))
    elif name:
        errors += invalid(f'{path}.name', name, dns1123_label_errors(name))
        if name in names:
            errors.append(FieldError(f'{path}.name', 'FieldValueDuplicate', f'Duplicate value: {go_repr(name)}'))
        names.add(name)
    errors += invalid(f'{path}.port', port.get('port', 0), port_number_errors(port.get('port', 0)))
    errors += _protocol_errors(port, path)
    target = port.get('targetPort')
    if isinstance(target, str):
        errors += invalid(f'{path}.targetPort', target, port_name_errors(target))
    elif isinstance(target, int):
        errors += invalid(f'{path}.targetPort', target, port_number_errors(target))
    return errors


# --------------------------------------------------------------------------- workloads

_WORKLOADS = {('apps', 'deployments'), ('apps', 'replicasets'), ('apps', 'statefulsets'), ('apps', 'daemonsets')}


def workload_errors(spec: Mapping[str, Any]) -> list[FieldError]:
    """ValidateDeploymentSpec and its siblings: replicas, selector, the pod template."""
    errors = []
    replicas = spec.get('replicas')
    if isinstance(replicas, int) and replicas < 0:
        errors += invalid('spec.replicas', replicas, ['must be greater than or equal to 0'])
    selector = spec.get('selector')
    if isinstance(selector, Mapping) and not selector.get('matchLabels') and not selector.get('matchExpressions'):
        errors += invalid('spec.selector', selector, ['empty selector is invalid for deployment'])
    template = spec.get('template') or {}
    labels = (template.get('metadata') or {}).get('labels') or {}
    if isinstance(selector, Mapping) and selector and not all(
            r.matches(labels) for r in LabelRequirement.from_selector(selector)):
        errors += invalid('spec.template.metadata.labels', labels, ['`selector` does not match template `labels`'])
    return errors + pod_spec_errors(template.get('spec') or {}, 'spec.template.spec', ('Always',))


# --------------------------------------------------------------------------- events

def event_errors(event: Mapping[str, Any]) -> list[FieldError]:
    """legacyValidateEvent (core/v1): the namespaces agree; new-style events (with an
    eventTime) name their reporter, instance, action and reason."""
    namespace = event['metadata'].get('namespace') or ''
    involved = (event.get('involvedObject') or {}).get('namespace') or ''
    errors = []
    if not event.get('eventTime'):
        mismatch = namespace not in ('', 'default') if not involved else namespace != involved
    else:
        mismatch = not involved and namespace not in ('default', 'kube-system')
        for key in ('reportingComponent', 'reportingInstance', 'action', 'reason'):
            if not event.get(key):
                errors.append(FieldError(key, 'FieldValueRequired', 'Required value'))
    if mismatch:
        errors = invalid('involvedObject.namespace', involved, ['does not match event.namespace']) + errors
    return errors


def _not_supported(path: str, value: Any, supported: tuple[str, ...]) -> FieldError:
    values = ', '.join(go_repr(v) for v in supported)
    return FieldError(path, 'FieldValueNotSupported', f'Unsupported value: {go_repr(value)}: supported values: {values}')
