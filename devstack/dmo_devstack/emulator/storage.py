"""
Storage, lists and watches: one cluster-wide resourceVersion counter and an event log.

Objects live in kmock's ``objects`` array (tests read it), keyed by resource,
namespace and name, with a bounded history. Every write takes the next
resourceVersion and appends a watch event to a log of ``watch_window`` events: a
watch resumes from any resourceVersion still in the log, older ones get a 410
``Expired`` ERROR event (and a list ``continue`` token that old a 410), after which
clients relist, as with a real API server whose watch cache moved on.
"""
from __future__ import annotations

import asyncio
import base64
import bisect
import copy
import json
import uuid
from collections.abc import Mapping
from typing import Any

import aiohttp.web
import attrs
import kmock
from kmock._internal import rendering  # internals: kmock is pinned

from .errors import ApiError, FieldError, go_repr
from .meta import now
from .resources import CRD_RESOURCE, SERVICES, ResourceType, Target
from .selectors import FIELD_LABELS, field_value, parse_field_selector, parse_label_selector
from .tables import to_table

#: The API server's message for a continue token it can no longer serve consistently.
_CONTINUE_EXPIRED = (
    'The provided continue parameter is too old to display a consistent list result. You can start a new list '
    'without the continue parameter, or use the continue token in this response to retrieve the remainder of the '
    'results. Continuing with the provided token results in an inconsistent list - objects that were created, '
    'modified, or deleted between the time the first chunk was returned and now may show up in the list.')
_MAX_HISTORY = 20  # object versions kept per object in kmock's objects array
_MAX_DELETED = 1_000  # deleted objects whose history is kept in kmock's objects array


@attrs.define
class WatchEvent:
    rv: int
    type: str
    resource: kmock.resource
    namespace: str | None
    object: dict[str, Any]
    old: dict[str, Any] | None  # the previous state of a MODIFIED object (for selectors)



class Storage:
    """The storage half of the emulator (a mixin of ``KubeEmulator``)."""

    def _key(self, rtype: ResourceType, namespace: str | None, name: str) -> tuple[Any, ...]:
        return (rtype.resource, namespace if rtype.namespaced else None, name)

    def _get_live(self, rtype: ResourceType, namespace: str | None, name: str) -> dict[str, Any] | None:
        key = self._key(rtype, namespace, name)
        if key not in self._objects:
            return None
        obj = self._objects[key]
        return None if obj.deleted else obj.raw

    def _live_items(self, rtype: ResourceType | None = None,
                    namespace: str | None = None) -> list[tuple[ResourceType, dict[str, Any]]]:
        out = []
        wanted = rtype.resource if rtype is not None else None  # (made anew at each access: once)
        for (res, ns, _), obj in self._objects.items():
            if obj.deleted:
                continue
            if wanted is not None and res != wanted:
                continue
            if namespace is not None and ns != namespace:
                continue
            t = self._types.get((res.group, res.version, res.plural))
            if t is not None:
                out.append((t, obj.raw))
        return out

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _emit(self, etype: str, rtype: ResourceType, obj: dict[str, Any], old: dict[str, Any] | None = None) -> None:
        event = WatchEvent(self._rv, etype, rtype.resource, obj['metadata'].get('namespace'),
                       copy.deepcopy(obj), old)
        self._events.append(event)
        if len(self._events) > self.watch_window:
            del self._events[:len(self._events) - self.watch_window]
        self._notify()
        self._gc_wakeup.set()

    def _notify(self) -> None:
        if self._tick is not None and not self._tick.done():
            self._tick.set_result(None)
        self._tick = None

    def _store_new(self, rtype: ResourceType, namespace: str | None, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj['metadata']
        meta['uid'] = str(uuid.uuid4())
        meta['resourceVersion'] = self._next_rv()
        meta['creationTimestamp'] = now()
        if rtype.has_generation:
            meta['generation'] = 1
        if namespace is not None:
            meta['namespace'] = namespace
        key = self._key(rtype, namespace, meta['name'])
        if key in self._objects:
            self._objects[key].create(obj)  # soft-deleted before: continue its history
        else:
            self._objects[key] = obj
        self._emit('ADDED', rtype, obj)
        return obj

    def _store_update(self, rtype: ResourceType, old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        meta = new['metadata']
        meta['resourceVersion'] = self._next_rv()
        key = self._key(rtype, meta.get('namespace'), meta['name'])
        history = self._objects[key].history
        history.append(new)
        if len(history) > _MAX_HISTORY:
            del history[:len(history) - _MAX_HISTORY]
        self._emit('MODIFIED', rtype, new, old)
        return new

    def _store_remove(self, rtype: ResourceType, obj: dict[str, Any]) -> None:
        meta = obj['metadata']
        key = self._key(rtype, meta.get('namespace'), meta['name'])
        self._objects[key].delete()
        self._deleted_keys.append(key)
        while len(self._deleted_keys) > _MAX_DELETED:
            old_key = self._deleted_keys.popleft()
            if old_key in self._objects and self._objects[old_key].deleted:
                del self._objects[old_key]
        if rtype.resource == SERVICES:
            self._allocated_ips.discard((obj.get('spec') or {}).get('clusterIP'))
        if rtype.resource == CRD_RESOURCE:
            self._unregister_crd(meta['name'])
        removed = copy.deepcopy(obj)
        removed['metadata']['resourceVersion'] = self._next_rv()
        self._emit('DELETED', rtype, removed)

    def _selectors(self, rtype: ResourceType, params: Mapping[str, str], name: str | None = None):
        labels = parse_label_selector(params.get('labelSelector', ''))
        allowed = {'metadata.name', 'metadata.namespace'} | FIELD_LABELS.get((rtype.group, rtype.plural), set())
        fields = parse_field_selector(params.get('fieldSelector', ''), allowed)
        if name is not None:
            fields.append(('metadata.name', True, name))

        def matches(obj: Mapping[str, Any]) -> bool:
            obj_labels = obj.get('metadata', {}).get('labels') or {}
            return all(r.matches(obj_labels) for r in labels) and \
                all((field_value(obj, f) == v) == eq for f, eq, v in fields)
        return matches

    def _list(self, target: Target, params: Mapping[str, str]) -> dict[str, Any]:
        errors = list_option_errors(params)
        if errors:
            raise list_options_invalid(errors)
        matches = self._selectors(target.rtype, params)
        items = [obj for _, obj in self._live_items(target.rtype, target.namespace)
                 if matches(obj)]
        def order(o: Mapping[str, Any]) -> list[str]:  # etcd's key order: namespace, then name
            return [o['metadata'].get('namespace') or '', o['metadata']['name']]

        items.sort(key=order)
        meta: dict[str, Any] = {'resourceVersion': str(self._rv)}
        if params.get('continue'):
            # The next page, after the last key of the previous one; the list keeps the
            # resourceVersion of its first page, so a watch from it misses nothing.
            try:
                token = json.loads(base64.b64decode(params['continue']))
                start, token_rv = list(token['start']), int(token['rv'])
            except (ValueError, KeyError, TypeError) as e:
                raise ApiError(400, 'BadRequest', f'continue key is not valid: {e}')
            if token_rv != -1 and self._expired(token_rv):
                raise self._continue_expired(start)
            if token_rv != -1:  # -1: the inconsistent continuation, at the current resourceVersion
                meta['resourceVersion'] = str(token_rv)
            items = [o for o in items if order(o) > start]
        limit = int(params.get('limit') or 0)
        if 0 < limit < len(items):
            token = {'v': 'meta.k8s.io/v1', 'rv': int(meta['resourceVersion']), 'start': order(items[limit - 1])}
            meta['continue'] = base64.b64encode(json.dumps(token).encode()).decode()
            meta['remainingItemCount'] = len(items) - limit
            items = items[:limit]
        return {'kind': f'{target.rtype.kind}List', 'apiVersion': target.rtype.api_version,
                'metadata': meta, 'items': items}

    def _oldest_rv(self) -> int:
        """The oldest resourceVersion a watch can still start from."""
        return (self._events[0].rv if self._events else self._rv + 1) - 1

    def _expired(self, rv: int) -> bool:
        return rv < self._oldest_rv() and rv < self._rv

    def _continue_expired(self, start: list[str]) -> ApiError:
        """A continue token older than the event log: 410, with a token to go on inconsistently."""
        token = {'v': 'meta.k8s.io/v1', 'rv': -1, 'start': start}
        error = ApiError(410, 'Expired', _CONTINUE_EXPIRED)
        error.metadata = {'continue': base64.b64encode(json.dumps(token).encode()).decode()}
        return error

    async def _watch(self, request: rendering.Request, target: Target) -> aiohttp.web.StreamResponse:
        params = request.params
        rtype = target.rtype
        errors = watch_option_errors(params)
        if errors:
            raise list_options_invalid(errors)
        matches = self._selectors(rtype, params, target.name)
        # timeoutSeconds=0 or none: the server's own (long) timeout, here until shutdown.
        timeout = float(params['timeoutSeconds']) if params.get('timeoutSeconds') else None
        timeout = timeout or None
        since = params.get('resourceVersion') or ''
        send_initial = _send_initial_events(params)
        bookmarks = params.get('allowWatchBookmarks') in ('true', '1')
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout is not None else None
        as_table = 'as=Table' in request.headers.get('Accept', '')
        first = True
        next_bookmark = loop.time() + self.bookmark_interval

        def bookmark(rv: int) -> dict[str, Any]:
            # An object of the kind with nothing but its resourceVersion.
            return {'kind': rtype.kind, 'apiVersion': rtype.api_version, 'metadata': {'resourceVersion': str(rv)}}

        def encode(etype: str, obj: dict[str, Any]) -> bytes:
            # kubectl get -w asks for tables: each event carries a one-row Table.
            nonlocal first
            if as_table and etype not in ('ERROR', 'BOOKMARK'):
                obj = to_table(rtype, [obj], None)
                if not first:
                    obj['columnDefinitions'] = []  # as the API server: only the first event has them
                first = False
            return json.dumps({'type': etype, 'object': obj}).encode() + b'\n'

        def visible(obj: Mapping[str, Any], namespace: str | None) -> bool:
            return (target.namespace is None or namespace == target.namespace) and matches(obj)

        response = aiohttp.web.StreamResponse(headers={'Content-Type': 'application/json'})
        assert request._raw_request is not None
        await response.prepare(request._raw_request)
        self._audit_response_started()
        async with self._lock:
            if send_initial:
                # The state now (at least as new as any resourceVersion asked for), then,
                # for a client that takes bookmarks, the bookmark ending the initial events.
                initial = [{'type': 'ADDED', 'object': obj}
                           for _, obj in self._live_items(rtype, target.namespace) if matches(obj)]
                cursor = self._rv
                if bookmarks:
                    initial.append({'type': 'BOOKMARK', 'object': {
                        'kind': rtype.kind, 'apiVersion': rtype.api_version, 'metadata': {
                            'resourceVersion': str(cursor), 'annotations': {INITIAL_EVENTS_END: 'true'}}}})
            elif since in ('', '0'):
                initial, cursor = [], self._rv  # sendInitialEvents=false: from now on
            else:
                initial = []
                cursor = int(since) if since.isdigit() else 0
                if self._expired(cursor):
                    # As the watch cache answers: 200, then one ERROR event with the 410.
                    initial = [{'type': 'ERROR', 'object': ApiError(
                        410, 'Expired', f'too old resource version: {since} ({self._oldest_rv()})').status()}]
                    cursor = -1
        try:
            for event in initial:
                await response.write(encode(event['type'], event['object']))
            while cursor >= 0 and not self._stopping:
                index = bisect.bisect_right(self._events, cursor, key=lambda e: e.rv)
                for event in self._events[index:]:
                    cursor = event.rv
                    if event.resource != rtype.resource:
                        continue
                    now_in = visible(event.object, event.namespace)
                    was_in = event.old is not None and visible(event.old, event.namespace)
                    etype = event.type
                    if etype == 'MODIFIED' and now_in and not was_in:
                        etype = 'ADDED'
                    elif etype == 'MODIFIED' and was_in and not now_in:
                        etype, now_in = 'DELETED', True
                    if now_in:
                        await response.write(encode(etype, event.object))
                if self._events and self._events[-1].rv > cursor:
                    continue  # events came while writing
                if self._tick is None:
                    self._tick = loop.create_future()
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    if params.get('allowWatchBookmarks') == 'true':
                        # As the API server does before closing a watch at its timeout.
                        await response.write(encode('BOOKMARK', bookmark(cursor)))
                    break
                if bookmarks and loop.time() >= next_bookmark:
                    # As the watch cache does about every minute (bookmarkFrequency): a
                    # client can tell a live watch from a connection that died silently.
                    await response.write(encode('BOOKMARK', bookmark(cursor)))
                    next_bookmark = loop.time() + self.bookmark_interval
                    continue
                if bookmarks:
                    remaining = min(next_bookmark - loop.time(), remaining if remaining is not None else float('inf'))
                await asyncio.wait([self._tick], timeout=remaining)
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away
        return response


#: The annotation of the bookmark that ends a watch's initial events (KEP-3157, "watch-list").
INITIAL_EVENTS_END = 'k8s.io/initial-events-end'


def _flag(value: str | None) -> bool | None:
    return None if value is None else value.lower() in ('true', '1', 't')


def _send_initial_events(params: Mapping[str, str]) -> bool:
    """Whether a watch starts with the current state (SetListOptionsDefaults, WatchList on):
    asked for explicitly, or a legacy watch from resourceVersion "" or "0"."""
    asked = _flag(params.get('sendInitialEvents'))
    if asked is not None:
        return asked
    return not params.get('resourceVersionMatch') and (params.get('resourceVersion') or '0') == '0'


def watch_option_errors(params: Mapping[str, str]) -> list[FieldError]:
    """validateWatchOptions of apimachinery's ListOptions validation (WatchList enabled)."""
    match = params.get('resourceVersionMatch') or ''
    send_initial = params.get('sendInitialEvents')
    errors = []
    if send_initial is not None and match != 'NotOlderThan':
        errors.append(FieldError('resourceVersionMatch', 'FieldValueForbidden',
                                 'Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan'))
    if match:
        if send_initial is None:
            errors.append(FieldError('resourceVersionMatch', 'FieldValueForbidden', 'Forbidden: resourceVersionMatch '
                                     'is forbidden for watch unless sendInitialEvents is provided'))
        if match != 'NotOlderThan':
            errors.append(FieldError('resourceVersionMatch', 'FieldValueNotSupported',
                                     f'Unsupported value: {go_repr(match)}: supported values: "NotOlderThan"'))
        if params.get('continue'):
            errors.append(FieldError('resourceVersionMatch', 'FieldValueForbidden',
                                     'Forbidden: resourceVersionMatch is forbidden when continue is provided'))
    return errors


def list_option_errors(params: Mapping[str, str]) -> list[FieldError]:
    """ValidateListOptions for a list (not a watch)."""
    match = params.get('resourceVersionMatch') or ''
    rv = params.get('resourceVersion') or ''
    errors = []
    if match:
        if not rv:
            errors.append(FieldError('resourceVersionMatch', 'FieldValueForbidden', 'Forbidden: resourceVersionMatch '
                                     'is forbidden unless resourceVersion is provided'))
        if params.get('continue'):
            errors.append(FieldError('resourceVersionMatch', 'FieldValueForbidden',
                                     'Forbidden: resourceVersionMatch is forbidden when continue is provided'))
        if match not in ('Exact', 'NotOlderThan'):
            errors.append(FieldError('resourceVersionMatch', 'FieldValueNotSupported', f'Unsupported value: '
                                     f'{go_repr(match)}: supported values: "Exact", "NotOlderThan", ""'))
        if match == 'Exact' and rv == '0':
            errors.append(FieldError('resourceVersionMatch', 'FieldValueForbidden',
                                     'Forbidden: resourceVersionMatch "exact" is forbidden for resourceVersion "0"'))
    if params.get('sendInitialEvents') is not None:
        errors.append(FieldError('sendInitialEvents', 'FieldValueForbidden',
                                 'Forbidden: sendInitialEvents is forbidden for list'))
    return errors


def list_options_invalid(errors: list[FieldError]) -> ApiError:
    """The 422 of invalid list or watch options (errors.NewInvalid of kind ListOptions)."""
    text = str(errors[0]) if len(errors) == 1 else '[' + ', '.join(map(str, errors)) + ']'
    return ApiError(422, 'Invalid', f'ListOptions.meta.k8s.io "" is invalid: {text}', {
        'group': 'meta.k8s.io', 'kind': 'ListOptions',
        'causes': [{'reason': e.type, 'message': e.detail, 'field': e.path} for e in errors]})
