"""
Deletion: finalizers, graceful pod deletion, deletecollection and the garbage collector.

As the generic registry does it: an object with finalizers (or a pod bound to a node,
which the kubelet stops) gets a ``deletionTimestamp`` and stays; it goes once the last
finalizer is removed. The garbage collector follows ``ownerReferences`` (background,
foreground, orphan), and the namespace and CRD controllers delete contents first:
controllers a real control plane runs, here one task woken by every write.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

from .errors import ApiError
from .meta import now
from .resources import CRD_FINALIZER, CRD_RESOURCE, NAMESPACES, PODS, ResourceType, Target

logger = logging.getLogger(__name__)

#: Kinds whose registries answer a DELETE with the deleted object (``ReturnDeletedObject``);
#: the others answer a ``Status`` naming it.
RETURN_DELETED_OBJECT = {('', 'pods'), ('', 'services'), ('', 'serviceaccounts'),
                         ('', 'persistentvolumes'), ('', 'persistentvolumeclaims')}


class Deletion:
    """The deletion half of the emulator (a mixin of ``KubeEmulator``)."""

    def _delete(self, target: Target, body: Any, params: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        assert target.name is not None
        rtype = target.rtype
        if target.subresource:
            raise ApiError(405, 'MethodNotAllowed', 'the server does not allow this method on the requested resource')
        obj = self._get_live(rtype, target.namespace, target.name)
        if obj is None:
            raise rtype.not_found(target.name)
        options = dict(body) if isinstance(body, Mapping) else {}
        for key in ('propagationPolicy', 'gracePeriodSeconds'):
            if key in params:
                options[key] = int(params[key]) if key == 'gracePeriodSeconds' else params[key]
        if 'orphanDependents' in params or 'orphanDependents' in options:
            orphan = str(params.get('orphanDependents', options.get('orphanDependents'))).lower() == 'true'
            options.setdefault('propagationPolicy', 'Orphan' if orphan else 'Background')
        pre = options.get('preconditions') or {}
        if pre.get('uid') and pre['uid'] != obj['metadata']['uid']:
            raise ApiError(409, 'Conflict', f'Precondition failed: UID in precondition: {pre["uid"]}, '
                           f'UID in object meta: {obj["metadata"]["uid"]}')
        if pre.get('resourceVersion') and pre['resourceVersion'] != obj['metadata']['resourceVersion']:
            raise ApiError(409, 'Conflict', f'Precondition failed: ResourceVersion in precondition: '
                           f'{pre["resourceVersion"]}, ResourceVersion in object meta: '
                           f'{obj["metadata"]["resourceVersion"]}')
        if params.get('dryRun') == 'All' or 'All' in (options.get('dryRun') or []):
            return 200, obj
        result = self.delete_object(rtype, obj, options.get('propagationPolicy', 'Background'),
                                    options.get('gracePeriodSeconds'))
        if result is not None:
            return 200, result  # kept (finalizers, grace period): the object with its deletionTimestamp
        if (rtype.group, rtype.plural) in RETURN_DELETED_OBJECT:
            return 200, obj
        return 200, {'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Success',
                     'details': {'name': target.name, 'group': rtype.group, 'kind': rtype.plural,
                                 'uid': obj['metadata']['uid']}}

    def delete_object(self, rtype: ResourceType, obj: dict[str, Any], propagation: str = 'Background',
                      grace: int | None = None) -> dict[str, Any] | None:
        """Delete (or mark for deletion) one object; the stored object if it stays, else None."""
        meta = obj['metadata']
        uid = meta['uid']
        if propagation == 'Orphan':
            for dtype, dep in self._live_items():
                refs = dep['metadata'].get('ownerReferences') or []
                if any(r.get('uid') == uid for r in refs):
                    new = copy.deepcopy(dep)
                    new['metadata']['ownerReferences'] = [r for r in refs if r.get('uid') != uid]
                    if not new['metadata']['ownerReferences']:
                        del new['metadata']['ownerReferences']
                    self._store_update(dtype, dep, new)
        finalizers = list(meta.get('finalizers') or [])
        if propagation == 'Foreground' and 'foregroundDeletion' not in finalizers and not meta.get('deletionTimestamp'):
            finalizers.append('foregroundDeletion')
        if rtype.resource == CRD_RESOURCE and CRD_FINALIZER not in finalizers and not meta.get('deletionTimestamp'):
            finalizers.append(CRD_FINALIZER)
        # A pod on a node is the kubelet's to stop (unless it has finished already).
        if rtype.resource == PODS and (obj.get('spec') or {}).get('nodeName') \
                and (obj.get('status') or {}).get('phase') not in ('Succeeded', 'Failed'):
            default_grace = (obj.get('spec') or {}).get('terminationGracePeriodSeconds', 30)
            grace = default_grace if grace is None else int(grace)
        else:
            grace = 0
        terminating_ns = rtype.resource == NAMESPACES
        if not finalizers and grace == 0 and not terminating_ns:
            self._store_remove(rtype, obj)
            return None
        new = copy.deepcopy(obj)
        new_meta = new['metadata']
        if new_meta.get('deletionTimestamp'):
            # Already being deleted: only a shorter grace period changes anything.
            if grace >= int(new_meta.get('deletionGracePeriodSeconds') or 0):
                return obj
        elif new_meta.get('generation'):
            # Controllers must see the deletion as a change: the registry bumps the
            # generation once, when deletionTimestamp is first set (markAsDeleting).
            new_meta['generation'] += 1
        new_meta['deletionTimestamp'] = now(grace)
        new_meta['deletionGracePeriodSeconds'] = grace
        if finalizers:
            new_meta['finalizers'] = finalizers
        if terminating_ns:
            new.setdefault('status', {})['phase'] = 'Terminating'
        return self._store_update(rtype, obj, new)

    def _delete_collection(self, target: Target, body: Any, params: Mapping[str, str]) -> dict[str, Any]:
        listed = self._list(target, params)
        options = dict(body) if isinstance(body, Mapping) else {}
        propagation = params.get('propagationPolicy', options.get('propagationPolicy', 'Background'))
        grace = params.get('gracePeriodSeconds', options.get('gracePeriodSeconds'))
        for obj in listed['items']:
            self.delete_object(target.rtype, obj, propagation, None if grace is None else int(grace))
        return {'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Success'}

    async def _collect_garbage(self) -> None:
        """The garbage collector, namespace and CRD finalizers: the controllers the server runs."""
        while True:
            await self._gc_wakeup.wait()
            self._gc_wakeup.clear()
            async with self._lock:
                try:
                    self._gc_pass()
                    self.update_disruption_budgets()
                    self.update_default_service_accounts()
                except Exception as e:  # an emulator bug: keep collecting, and let tests see it
                    logger.exception('The garbage collector failed.')
                    if self._errors:
                        self._errors[-1].append(e)

    def _gc_pass(self) -> None:
        items = self._live_items()
        by_uid = {obj['metadata']['uid']: (t, obj) for t, obj in items}
        dependents: dict[str, list[str]] = {}
        for dtype, obj in items:
            meta = obj['metadata']
            refs = meta.get('ownerReferences') or []
            for ref in refs:
                dependents.setdefault(ref.get('uid'), []).append(meta['uid'])
            if not refs or meta.get('deletionTimestamp'):
                continue
            dangling = [r for r in refs if r.get('uid') not in by_uid]
            foreground = [r for r in refs if r.get('uid') in by_uid and 'foregroundDeletion' in
                          (by_uid[r['uid']][1]['metadata'].get('finalizers') or [])]
            if len(dangling) + len(foreground) == len(refs):
                self.delete_object(dtype, obj, 'Foreground' if foreground else 'Background')
            elif dangling:
                new = copy.deepcopy(obj)
                new['metadata']['ownerReferences'] = [r for r in refs if r not in dangling]
                self._store_update(dtype, obj, new)
        for otype, obj in items:
            meta = obj['metadata']
            if not meta.get('deletionTimestamp'):
                continue
            current = self._get_live(otype, meta.get('namespace'), meta['name'])
            if current is None or current['metadata']['uid'] != meta['uid']:
                continue
            finalizers = list(current['metadata'].get('finalizers') or [])
            if 'foregroundDeletion' in finalizers:
                live_deps = [u for u in dependents.get(meta['uid'], []) if u in by_uid
                             and self._still_live(*by_uid[u])]
                if not live_deps:
                    finalizers.remove('foregroundDeletion')
            if otype.resource == CRD_RESOURCE and CRD_FINALIZER in finalizers:
                crs = [(t, o) for t, o in self._live_items() if t.crd == meta['name']]
                for t, o in crs:
                    if not o['metadata'].get('deletionTimestamp'):
                        self.delete_object(t, o)
                if not crs:
                    finalizers.remove(CRD_FINALIZER)
            if otype.resource == NAMESPACES:
                contents = [(t, o) for t, o in self._live_items(namespace=meta['name']) if t.namespaced]
                for t, o in contents:
                    if not o['metadata'].get('deletionTimestamp'):
                        self.delete_object(t, o)
                if not contents and not finalizers:
                    self._store_remove(otype, current)
                    continue
            if finalizers != list(current['metadata'].get('finalizers') or []):
                new = copy.deepcopy(current)
                new['metadata']['finalizers'] = finalizers
                if not finalizers:
                    del new['metadata']['finalizers']
                if finalizers or otype.resource == NAMESPACES:
                    self._store_update(otype, current, new)
                else:
                    self._store_remove(otype, current)  # the last finalizer: deleted, not updated

    def _still_live(self, rtype: ResourceType, obj: dict[str, Any]) -> bool:
        current = self._get_live(rtype, obj['metadata'].get('namespace'), obj['metadata']['name'])
        return current is not None and current['metadata']['uid'] == obj['metadata']['uid']
