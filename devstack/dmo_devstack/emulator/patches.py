"""
PATCH bodies: JSON patch (RFC 6902), merge patch (RFC 7386) and strategic merge patch.

kopf sends merge patches and JSON patches (with a ``test`` on the resourceVersion for
its finalizers), kubectl ``apply`` and Helm's upgrades send strategic merge patches for
built-in kinds: lists merge by the merge keys of the Go types (containers by ``name``,
webhooks by ``name``...), read from the kind's OpenAPI schema
(``x-kubernetes-patch-strategy``/``-merge-key``) or, for a kind without one, from
``MERGE_KEYS`` by field name; ``$setElementOrder`` orders the merged lists as
apimachinery does.
Custom resources have no Go types, so the real server refuses strategic patches for
them with 415; so does this one.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import attrs
import jsonpatch

from .builtin_schema import patch_meta_root
from .errors import ApiError

# Strategic-merge-patch merge keys of the built-in types (from their Go struct tags).
MERGE_KEYS: dict[str, str] = {
    'containers': 'name', 'initContainers': 'name', 'ephemeralContainers': 'name',
    'env': 'name', 'volumes': 'name', 'volumeMounts': 'mountPath',
    'volumeDevices': 'devicePath', 'imagePullSecrets': 'name', 'conditions': 'type',
    'ownerReferences': 'uid', 'hostAliases': 'ip', 'topologySpreadConstraints': 'topologyKey',
    'resourceClaims': 'name', 'readinessGates': 'conditionType', 'subsets': '',
}
MERGE_PRIMITIVE_LISTS = {'finalizers'}


@attrs.frozen
class PatchMeta:
    """A place in a built-in kind's OpenAPI schema: what a strategic merge patch needs
    there (``x-kubernetes-patch-strategy`` and ``-merge-key`` of its lists), as the API
    server reads them from the Go struct tags. Without one (a kind without a schema),
    the merge keys of ``MERGE_KEYS`` are used, by field name."""
    node: Mapping[str, Any]
    defs: Mapping[str, Any]

    def _resolved(self) -> Mapping[str, Any]:
        node = self.node
        while '$ref' in node:
            node = self.defs[node['$ref'].rsplit('/', 1)[1]]
        return node

    def child(self, key: str) -> PatchMeta | None:
        node = self._resolved()
        sub = (node.get('properties') or {}).get(key)
        if sub is None and isinstance(node.get('additionalProperties'), Mapping):
            sub = node['additionalProperties']
        return None if sub is None else PatchMeta(sub, self.defs)

    def items(self) -> PatchMeta | None:
        sub = self._resolved().get('items')
        return None if not isinstance(sub, Mapping) else PatchMeta(sub, self.defs)

    def list_merge(self) -> tuple[bool, str | None]:
        """(merged rather than replaced, its merge key) for the list at this place."""
        strategy = self.node.get('x-kubernetes-patch-strategy') or ''
        return 'merge' in strategy.split(','), self.node.get('x-kubernetes-patch-merge-key')


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any, field: str = '', meta: PatchMeta | None = None) -> Any:
    """Strategic merge patch as kubectl and Helm need it for built-in kinds (``meta``:
    where ``target`` is in its kind's schema, when known)."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    if patch.get('$patch') == 'replace':
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != '$patch'}
    if patch.get('$patch') == 'delete':
        return None
    result = dict(target) if isinstance(target, Mapping) else {}
    retain = patch.get('$retainKeys')
    for key, value in patch.items():
        if key.startswith('$setElementOrder/') or key in ('$retainKeys', '$patch'):
            continue  # ordering hints and directives handled elsewhere
        if key.startswith('$deleteFromPrimitiveList/'):
            name = key.split('/', 1)[1]
            result[name] = [v for v in result.get(name) or [] if v not in value]
            continue
        sub = meta.child(key) if meta is not None else None
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and isinstance(result.get(key), list):
            result[key] = _merge_list(result[key], value, key, sub)
        else:
            merged = strategic_merge_patch(result.get(key), value, key, sub)
            if merged is None and isinstance(value, Mapping) and value.get('$patch') == 'delete':
                result.pop(key, None)
            else:
                result[key] = merged
    for key, order in patch.items():
        if key.startswith('$setElementOrder/') and isinstance(order, list):
            name = key.split('/', 1)[1]
            if isinstance(result.get(name), list):
                original = target.get(name) if isinstance(target, Mapping) else None
                result[name] = _set_element_order(result[name], order, original or [], name,
                                                  meta.child(name) if meta is not None else None)
    if retain is not None:
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _set_element_order(merged: list[Any], order: list[Any], original: list[Any], field: str,
                       meta: PatchMeta | None) -> list[Any]:
    """The ``$setElementOrder`` directive (apimachinery's normalizeElementOrder): the items
    it names come in its order, the items only the server has keep their place relative
    to them as in the live list."""
    key = _list_strategy(field, merged + order, meta)[1]

    def ident(item: Any) -> Any:
        return item.get(key) if key and isinstance(item, Mapping) else item

    wanted = [ident(o) for o in order]
    live = [ident(o) for o in original]
    in_patch = sorted((m for m in merged if ident(m) in wanted), key=lambda m: wanted.index(ident(m)))
    server_only = [m for m in merged if ident(m) not in wanted]
    server_only.sort(key=lambda m: live.index(ident(m)) if ident(m) in live else len(live))
    # mergeSortedSlice: a server-only item goes before the next patch item it preceded live.
    out: list[Any] = []
    i = j = 0
    while i < len(server_only) or j < len(in_patch):
        if j >= len(in_patch) or (i < len(server_only) and ident(server_only[i]) in live
                                  and ident(in_patch[j]) in live
                                  and live.index(ident(server_only[i])) < live.index(ident(in_patch[j]))):
            out.append(server_only[i])
            i += 1
        else:
            out.append(in_patch[j])
            j += 1
    return out


def _list_strategy(field: str, items: list[Any], meta: PatchMeta | None) -> tuple[bool, str | None]:
    """(merged, merge key) of a list: from the schema when known, else by field name."""
    if meta is not None:
        return meta.list_merge()
    if field in MERGE_PRIMITIVE_LISTS:
        return True, None
    if field == 'ports':  # container ports merge on containerPort, service ports on port
        return True, 'containerPort' if any(isinstance(p, Mapping) and 'containerPort' in p for p in items) else 'port'
    key = MERGE_KEYS.get(field) or None
    return key is not None, key


def _merge_list(current: list[Any], patch: list[Any], field: str, meta: PatchMeta | None) -> list[Any]:
    merged, key = _list_strategy(field, patch, meta)
    if merged and key is None and not any(isinstance(p, Mapping) for p in patch):
        return current + [v for v in patch if v not in current]  # a set of primitives (finalizers)
    if not merged or not key or not all(isinstance(p, Mapping) for p in patch):
        return [p for p in copy.deepcopy(patch) if not (isinstance(p, Mapping) and p.get('$patch'))]
    if any(isinstance(p, Mapping) and p.get('$patch') == 'replace' for p in patch):
        return [p for p in copy.deepcopy(patch) if not p.get('$patch')]
    items = meta.items() if meta is not None else None
    result = [copy.deepcopy(item) for item in current]
    for item in patch:
        index = next((i for i, old in enumerate(result)
                      if isinstance(old, Mapping) and old.get(key) == item.get(key)), None)
        if item.get('$patch') == 'delete':
            if index is not None:
                del result[index]
        elif index is None:
            result.append(strategic_merge_patch({}, item, '', items))
        else:
            result[index] = strategic_merge_patch(result[index], item, '', items)
    return result


def check_patch_type(ctype: str, custom: bool) -> None:
    """The 415 for a patch type not served, which the API server answers before it looks
    the object up (server-side apply, ``application/apply-patch+yaml``, is not emulated)."""
    served = ['application/json-patch+json', 'application/merge-patch+json']
    if not custom:
        served.append('application/strategic-merge-patch+json')
    if ctype not in served:
        raise ApiError(415, 'UnsupportedMediaType', 'the body of the request was in an unknown format - accepted '
                       'media types include: ' + ', '.join(served))


def apply_patch(base: dict[str, Any], body: Any, ctype: str, custom: bool) -> Any:
    """Apply a PATCH body of the given Content-Type; custom resources have no strategic merge."""
    check_patch_type(ctype, custom)
    if ctype == 'application/strategic-merge-patch+json':
        return strategic_merge_patch(base, body, '', patch_meta(base.get('apiVersion', ''), base.get('kind', '')))
    if ctype == 'application/json-patch+json':
        try:
            return jsonpatch.JsonPatch(body).apply(copy.deepcopy(base))
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
            # As apimachinery's NewGenericServerResponse(422): generic message, detail in causes.
            raise ApiError(422, 'Invalid', 'the server rejected our request due to an error in our request',
                           {'causes': [{'reason': 'UnexpectedServerResponse', 'message': str(e)}]})
    if ctype == 'application/merge-patch+json':
        return merge_patch(base, body)
    return strategic_merge_patch(base, body)


def patch_meta(api_version: str, kind: str) -> PatchMeta | None:
    """The schema place of a built-in kind's root, or None for a kind without a schema."""
    group, _, version = api_version.rpartition('/')
    root = patch_meta_root(group, version, kind)
    return None if root is None else PatchMeta(*root)
