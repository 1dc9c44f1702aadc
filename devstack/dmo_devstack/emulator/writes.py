"""
Writes: create, replace (PUT), patch, and the ``/status`` and ``/scale`` subresources.

Every write goes through admission as in the API server: server-side metadata,
defaults, CRD pruning/defaulting/validation, validation of built-in kinds, then
optimistic concurrency on ``resourceVersion``; a write that changes nothing stores
nothing (no new resourceVersion, no event: kopf relies on it).
"""
from __future__ import annotations

import copy
import json
import random
from collections.abc import Mapping
from typing import Any

from .admission import MUTATING_WEBHOOKS, configuration_defaults, configuration_errors
from .builtin import builtin_defaults, check_builtin, check_builtin_update, check_pod_update, write_defaults
from .builtin_schema import schema_for
from .errors import ApiError, FieldError, go_repr
from .jsonpath import eval_jsonpath, set_dotted
from .meta import (GENERATE_ALPHABET, check_labels, check_owner_references, dns1035_label_errors,
                   dns1123_label_errors, dns1123_subdomain_errors, invalid)
from .patches import apply_patch, check_patch_type
from .resources import CRD_RESOURCE, NAMESPACES, SERVICES, PODS, ResourceType, Target, crd_status
from .schema import check_schema


class Writes:
    """The write half of the emulator (a mixin of ``KubeEmulator``)."""

    def _check_namespace(self, target: Target, creating: bool) -> None:
        if not target.rtype.namespaced:
            return
        ns = self._get_live(self._types['', 'v1', 'namespaces'], None, target.namespace or '')
        if ns is None:
            raise ApiError(404, 'NotFound', f'namespaces "{target.namespace}" not found',
                           {'name': target.namespace, 'kind': 'namespaces'})
        if creating and ns['metadata'].get('deletionTimestamp'):
            raise ApiError(403, 'Forbidden', f'{target.rtype.qualified} "" is forbidden: unable to create new '
                           f'content in namespace {target.namespace} because it is being terminated',
                           {'kind': target.rtype.plural, 'group': target.rtype.group})

    def _create(self, target: Target, body: Any, params: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
        rtype = target.rtype
        if not isinstance(body, dict):
            raise ApiError(400, 'BadRequest', 'the body of the request was not a JSON object')
        if target.subresource:
            raise ApiError(405, 'MethodNotAllowed', 'the server does not allow this method on the requested resource')
        obj = copy.deepcopy(body)
        obj.setdefault('apiVersion', rtype.api_version)
        obj.setdefault('kind', rtype.kind)
        if obj['kind'] != rtype.kind or obj['apiVersion'] != rtype.api_version:
            raise ApiError(400, 'BadRequest', f'the API version in the data ({obj["apiVersion"]}) does not match '
                           f'the expected API version ({rtype.api_version})' if obj['apiVersion'] != rtype.api_version
                           else f'{obj["kind"]} is not suitable for {rtype.kind}')
        meta = obj.setdefault('metadata', {})
        if not isinstance(meta, dict):
            raise ApiError(400, 'BadRequest', 'metadata must be an object')
        if rtype.namespaced:
            if meta.get('namespace') and target.namespace and meta['namespace'] != target.namespace:
                raise ApiError(400, 'BadRequest', 'the namespace of the provided object does not match '
                               'the namespace sent on the request')
            target = Target(rtype, target.namespace or meta.get('namespace'), None, None)
            if not target.namespace:
                raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
            meta['namespace'] = target.namespace  # from the URL, before validation (BeforeCreate)
        else:
            meta.pop('namespace', None)
        for key in ('uid', 'resourceVersion', 'creationTimestamp', 'deletionTimestamp',
                    'deletionGracePeriodSeconds', 'generation', 'selfLink'):
            meta.pop(key, None)
        if not meta.get('name') and meta.get('generateName'):
            for _ in range(100):
                name = meta['generateName'] + ''.join(random.choices(GENERATE_ALPHABET, k=5))
                if self._get_live(rtype, target.namespace, name) is None:
                    meta['name'] = name
                    break
        name = meta.get('name') or ''
        self._check_namespace(target, creating=True)
        if 'status' in rtype.subresources:
            obj.pop('status', None)  # the strategies of kinds with a status subresource reset it
        builtin_defaults(rtype, obj)
        if name and self._get_live(rtype, target.namespace, name) is not None:
            raise ApiError(409, 'AlreadyExists', f'{rtype.qualified} "{name}" already exists',
                           {'name': name, 'group': rtype.group, 'kind': rtype.plural})
        warnings = self._admit(rtype, None, obj, params)
        if params.get('dryRun') == 'All':
            return obj, warnings
        if rtype.resource == SERVICES and obj['spec']['clusterIP'] != 'None':
            self._allocated_ips.add(obj['spec']['clusterIP'])
        if rtype.resource == CRD_RESOURCE:
            obj['status'] = crd_status(obj)
        obj = self._store_new(rtype, target.namespace if rtype.namespaced else None, obj)
        if rtype.resource == CRD_RESOURCE:
            self.register_crd(obj)
        return obj, warnings

    def _admit(self, rtype: ResourceType, old: dict[str, Any] | None, obj: dict[str, Any],
               params: Mapping[str, str]) -> list[str]:
        """Defaults, pruning and validation of a new object state; returns warnings."""
        meta = obj['metadata']
        name = meta.get('name') or ''
        builtin = rtype.crd is None and rtype.resource != CRD_RESOURCE
        schema = schema_for(rtype.group, rtype.version, rtype.kind) if builtin else None
        if builtin:
            write_defaults(rtype, obj)
        if rtype.resource == MUTATING_WEBHOOKS:
            configuration_defaults(obj)
        # Decoding comes first: a wrong JSON type is a 400 before any validation.
        errors: list[FieldError] = schema.check(obj, rtype.api_version) if schema else []
        if rtype.resource == MUTATING_WEBHOOKS:
            errors = configuration_errors(obj, errors)
        if not name:
            errors.append(FieldError('metadata.name', 'FieldValueRequired',
                                     'Required value: name or generateName is required'))
        elif old is None:
            errors += invalid('metadata.name', name, _name_errors(rtype, name))
        errors.extend(check_labels(meta))
        errors.extend(check_owner_references(meta))
        warnings: list[str] = []
        if rtype.schema is not None:
            unknown = rtype.schema.prune(obj)
            mode = params.get('fieldValidation', 'Warn')  # the API server's default
            if unknown and mode == 'Strict':
                fields = ', '.join(f'unknown field "{p.lstrip(".")}"' for p in unknown)
                raise ApiError(400, 'BadRequest', f'{rtype.kind} in version "{rtype.version}" cannot be handled as '
                               f'a {rtype.kind}: strict decoding error: {fields}')
            if mode == 'Warn':
                warnings = [f'unknown field "{p.lstrip(".")}"' for p in unknown]
            rtype.schema.default(obj)
            errors.extend(rtype.schema.validate(obj))
        if old is not None and (meta.get('deletionTimestamp')):
            added = set(meta.get('finalizers') or []) - set(old['metadata'].get('finalizers') or [])
            if added:
                errors.append(FieldError('metadata.finalizers', 'FieldValueForbidden',
                                         f'Forbidden: no new finalizers can be added if the object is being deleted, '
                                         f'found new finalizers []string{{{", ".join(map(json.dumps, sorted(added)))}}}'))
        if rtype.resource == SERVICES:
            errors.extend(self._admit_service(old, obj))
        if rtype.resource == CRD_RESOURCE:
            errors.extend(self._admit_crd(old, obj))
        if builtin:
            errors.extend(check_builtin(rtype, obj))  # after the service defaults above
            if old is not None:
                errors.extend(check_builtin_update(rtype, old, obj))
        if errors:
            raise rtype.invalid(name, errors)
        return warnings

    def _admit_crd(self, old: dict[str, Any] | None, obj: dict[str, Any]) -> list[FieldError]:
        spec = obj.get('spec') or {}
        names = spec.get('names') or {}
        errors = []
        expected = f'{names.get("plural")}.{spec.get("group")}'
        if obj['metadata'].get('name') != expected:
            errors.append(FieldError('metadata.name', 'FieldValueInvalid',
                                     f'Invalid value: {go_repr(obj["metadata"].get("name"))}: must be spec.names.'
                                     f'plural+"."+spec.group'))
        for i, ver in enumerate(spec.get('versions') or []):
            schema = (ver.get('schema') or {}).get('openAPIV3Schema')
            if schema is not None:
                errors.extend(check_schema(schema, f'spec.versions[{i}].schema.openAPIV3Schema'))
        return errors

    def _finish_write(self, target: Target, old: dict[str, Any], new: dict[str, Any],
                      params: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
        """Turn a requested new state into the stored one (the common path of PUT and PATCH)."""
        rtype = target.rtype
        name = old['metadata']['name']
        if not isinstance(new, dict) or not isinstance(new.get('metadata', {}), dict):
            raise ApiError(400, 'BadRequest', 'the body of the request was not a valid object')
        new = copy.deepcopy(new)  # patches share unchanged parts with the stored version
        new_meta = new.setdefault('metadata', {})
        rv = new_meta.get('resourceVersion')
        if rv and rv != old['metadata']['resourceVersion']:
            raise rtype.conflict(name)
        if new_meta.get('name', name) != name:
            raise ApiError(400, 'BadRequest', f'the name of the object ({new_meta["name"]}) does not match '
                           f'the name on the URL ({name})')
        if target.subresource == 'status':
            # Only .status changes through /status.
            status = new.get('status')
            new = copy.deepcopy(old)
            if status is None:
                new.pop('status', None)
            else:
                new['status'] = status
        elif 'status' in rtype.subresources:
            # The main endpoint ignores .status when there is a status subresource.
            new.pop('status', None)
            if 'status' in old:
                new['status'] = copy.deepcopy(old['status'])
        new['apiVersion'], new['kind'] = old['apiVersion'], old['kind']
        meta = new['metadata']
        # Fields only the server writes.
        for key in ('uid', 'creationTimestamp', 'deletionTimestamp', 'deletionGracePeriodSeconds',
                    'generation', 'namespace'):
            if key in old['metadata']:
                meta[key] = old['metadata'][key]
            else:
                meta.pop(key, None)
        meta['name'] = name
        warnings = self._admit(rtype, old, new, params)
        ignored = {'metadata'} | ({'status'} if rtype.schema is None or 'status' in rtype.subresources else set())
        if {k: v for k, v in new.items() if k not in ignored} != {k: v for k, v in old.items() if k not in ignored}:
            if rtype.has_generation:
                meta['generation'] = int(old['metadata'].get('generation', 1)) + 1
            if rtype.resource == PODS and target.subresource is None:
                check_pod_update(rtype, old, new)
        meta['resourceVersion'] = old['metadata']['resourceVersion']
        if new == old:
            return old, warnings  # a no-op write: no new resourceVersion, no event
        if params.get('dryRun') == 'All':
            return new, warnings
        if _finalized(rtype, old, new):
            # Store.Update: not written but deleted (one DELETED event); clients get the
            # object as they asked for it.
            self._store_remove(rtype, old)
            return new, warnings
        stored = self._store_update(rtype, old, new)
        if rtype.resource == CRD_RESOURCE:
            self._unregister_crd(name)
            self.register_crd(stored)
        return stored, warnings

    def _replace(self, target: Target, body: Any, params: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
        assert target.name is not None
        rtype = target.rtype
        old = self._get_live(rtype, target.namespace, target.name)
        if old is None:
            raise rtype.not_found(target.name)
        if target.subresource == 'scale':
            return self._write_scale(target, old, body, params)
        return self._finish_write(target, old, self._updated_object(target, old, body, 'PUT', ''), params)

    def _updated_object(self, target: Target, old: dict[str, Any], body: Any, method: str, ctype: str) -> Any:
        """The new state a PUT body or a PATCH asks for (before admission)."""
        rtype = target.rtype
        if method == 'PATCH':
            return apply_patch(old, body, ctype, custom=rtype.crd is not None)
        # Custom resources and CRDs do not allow unconditional updates (their strategies say so).
        if (rtype.crd is not None or rtype.resource == CRD_RESOURCE) and isinstance(body, Mapping) \
                and not (body.get('metadata') or {}).get('resourceVersion'):
            raise rtype.invalid(old['metadata']['name'], [FieldError(
                'metadata.resourceVersion', 'FieldValueInvalid', 'Invalid value: 0x0: must be specified for an update')])
        return copy.deepcopy(body)

    def _patch(self, target: Target, body: Any, ctype: str,
               params: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
        assert target.name is not None
        rtype = target.rtype
        check_patch_type(ctype, custom=rtype.crd is not None)  # before the lookup, as the API server does
        old = self._get_live(rtype, target.namespace, target.name)
        if old is None:
            raise rtype.not_found(target.name)
        base = self._to_scale(rtype, old) if target.subresource == 'scale' else old
        new = apply_patch(base, body, ctype, custom=rtype.crd is not None)
        if target.subresource == 'scale':
            return self._write_scale(target, old, new, params)
        return self._finish_write(target, old, new, params)

    def _to_scale(self, rtype: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
        assert rtype.scale is not None
        spec = eval_jsonpath(obj, rtype.scale['specReplicasPath'])
        status = eval_jsonpath(obj, rtype.scale.get('statusReplicasPath', ''))
        scale: dict[str, Any] = {
            'kind': 'Scale', 'apiVersion': 'autoscaling/v1',
            'metadata': {k: obj['metadata'][k] for k in ('name', 'namespace', 'uid', 'resourceVersion',
                                                         'creationTimestamp') if k in obj['metadata']},
            'spec': {'replicas': spec[0] if spec else 0},
            'status': {'replicas': status[0] if status else 0}}
        selector = eval_jsonpath(obj, rtype.scale['labelSelectorPath']) if rtype.scale.get('labelSelectorPath') else []
        if selector and isinstance(selector[0], Mapping):
            labels = selector[0].get('matchLabels') or {}
            scale['status']['selector'] = ','.join(f'{k}={v}' for k, v in sorted(labels.items()))
        elif selector:
            scale['status']['selector'] = selector[0]
        return scale

    def _write_scale(self, target: Target, old: dict[str, Any], scale: Any,
                     params: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
        rtype = target.rtype
        assert rtype.scale is not None
        replicas = (scale.get('spec') or {}).get('replicas') if isinstance(scale, Mapping) else None
        if not isinstance(replicas, int) or replicas < 0:
            raise ApiError(422, 'Invalid', f'Scale.autoscaling "{old["metadata"]["name"]}" is invalid: '
                           f'spec.replicas: Invalid value: {go_repr(replicas)}: must be greater than or equal to 0')
        rv = (scale.get('metadata') or {}).get('resourceVersion')
        if rv and rv != old['metadata']['resourceVersion']:
            raise rtype.conflict(old['metadata']['name'])
        new = copy.deepcopy(old)
        set_dotted(new, rtype.scale['specReplicasPath'], replicas)
        main = Target(rtype, target.namespace, target.name, None)
        stored, warnings = self._finish_write(main, old, new, {**params, 'fieldValidation': 'Ignore'})
        return self._to_scale(rtype, stored), warnings


def _finalized(rtype: ResourceType, old: dict[str, Any], new: dict[str, Any]) -> bool:
    """An update that deletes (ShouldDeleteDuringUpdate): the last finalizer removed from an
    object being deleted, unless a grace period still runs (a pod's: the kubelet's turn)."""
    if new['metadata'].get('finalizers') or rtype.resource == NAMESPACES:
        return False
    old_meta = old['metadata']
    return bool(old_meta.get('deletionTimestamp')) and not old_meta.get('deletionGracePeriodSeconds')


def _name_errors(rtype: ResourceType, name: str) -> list[str]:
    """ValidateNameFunc of the kind: namespaces are DNS-1123 labels, services DNS-1035 labels."""
    if rtype.resource == NAMESPACES:
        return dns1123_label_errors(name)
    if rtype.resource == SERVICES:
        return dns1035_label_errors(name)
    return dns1123_subdomain_errors(name)
