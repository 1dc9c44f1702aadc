"""
Evictions (``POST pods/{name}/eviction``) and the PodDisruptionBudget status they read.

As the eviction REST of kube-apiserver does it: a pod that is not running (Pending,
Succeeded, Failed) or already being deleted is deleted at once; otherwise the one
PodDisruptionBudget that selects it must allow a disruption (``status.
disruptionsAllowed``, for the budget's current generation), else the answer is 429
TooManyRequests. An eviction that passes spends one disruption (``disruptedPods``)
and deletes the pod gracefully. The status is written by the disruption controller
of kube-controller-manager; here by ``update_disruption_budgets``, run with the
garbage collector after every write.
"""
from __future__ import annotations

import copy
import datetime
import math
from collections.abc import Mapping
from typing import Any

from .errors import ApiError
from .meta import now, parse_time
from .resources import PODS, ResourceType, Target
from .selectors import LabelRequirement

_NOT_RUNNING = ('Pending', 'Succeeded', 'Failed')
_BUDGET_VIOLATED = "Cannot evict pod as it would violate the pod's disruption budget."
#: How long an eviction the controller has not seen yet counts against the budget.
_DISRUPTION_TIMEOUT = datetime.timedelta(minutes=2)


class Eviction:
    """Evictions and the disruption controller (a mixin of ``KubeEmulator``)."""

    def _evict(self, target: Target, body: Any) -> dict[str, Any]:
        """POST pods/<name>/eviction (what ``kubectl drain`` does)."""
        assert target.name is not None
        pod = self._get_live(target.rtype, target.namespace, target.name)
        if pod is None:
            raise target.rtype.not_found(target.name)
        if not _ignores_budgets(pod):
            budgets = self._budgets_of(pod)
            if len(budgets) > 1:
                raise ApiError(500, 'InternalError', 'This pod has more than one PodDisruptionBudget, which the '
                               'eviction subresource does not support.')
            if budgets and not _evictable_unhealthy(pod, budgets[0][1]):
                self._spend_disruption(*budgets[0], pod)
        options = (body or {}).get('deleteOptions') or {} if isinstance(body, Mapping) else {}
        self.delete_object(target.rtype, pod, options.get('propagationPolicy', 'Background'),
                           options.get('gracePeriodSeconds'))
        return {'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Success', 'code': 201}

    def _budgets_of(self, pod: Mapping[str, Any]) -> list[tuple[ResourceType, dict[str, Any]]]:
        labels = pod['metadata'].get('labels') or {}
        return [(t, pdb) for t, pdb in self._live_budgets(pod['metadata']['namespace'])
                if _selects((pdb.get('spec') or {}).get('selector'), labels)]

    def _live_budgets(self, namespace: str | None = None) -> list[tuple[ResourceType, dict[str, Any]]]:
        return [(t, o) for t, o in self._live_items(namespace=namespace)
                if (t.group, t.plural) == ('policy', 'poddisruptionbudgets')]

    def _spend_disruption(self, rtype: ResourceType, pdb: dict[str, Any], pod: Mapping[str, Any]) -> None:
        """checkAndDecrement: refuse (429) or record the disruption in the budget's status."""
        name = pdb['metadata']['name']
        status = pdb.get('status') or {}
        if status.get('observedGeneration', 0) < pdb['metadata'].get('generation', 1):
            raise _too_many_requests(f'The disruption budget {name} is still being processed by the server.', 10)
        allowed = status.get('disruptionsAllowed', 0)
        if allowed < 0:
            raise ApiError(403, 'Forbidden', f'poddisruptionbudgets.policy "{name}" is forbidden: pdb disruptions '
                           f'allowed is negative', {'name': name, 'group': 'policy', 'kind': 'poddisruptionbudgets'})
        if allowed == 0:
            raise _too_many_requests(f'The disruption budget {name} needs {status.get("desiredHealthy", 0)} healthy '
                                     f'pods and has {status.get("currentHealthy", 0)} currently', 0)
        new = copy.deepcopy(pdb)
        new['status']['disruptionsAllowed'] = allowed - 1
        new['status'].setdefault('disruptedPods', {})[pod['metadata']['name']] = now()
        if allowed == 1:
            new['status']['conditions'] = _allowed_condition(new['status'], False)
        self._store_update(rtype, pdb, new)

    # ------------------------------------------------------------- the disruption controller

    def update_disruption_budgets(self) -> None:
        """Recompute every budget's status from the pods it selects (only real changes are written)."""
        for rtype, pdb in self._live_budgets():
            pods = [o for t, o in self._live_items(namespace=pdb['metadata']['namespace']) if t.resource == PODS
                    and _selects((pdb.get('spec') or {}).get('selector'), o['metadata'].get('labels') or {})]
            status = _budget_status(pdb, pods, self._controller_replicas)
            if status != pdb.get('status'):
                self._store_update(rtype, pdb, {**pdb, 'status': status})

    def _controller_replicas(self, namespace: str, ref: Mapping[str, Any]) -> int | None:
        """The scale of a pod's controller (what getExpectedPodCount asks the scale subresource)."""
        for t, obj in self._live_items(namespace=namespace):
            if obj['metadata']['uid'] == ref.get('uid') and t.scale is not None:
                return int((obj.get('spec') or {}).get('replicas', 1))
        return None


def _budget_status(pdb: Mapping[str, Any], pods: list[dict[str, Any]], replicas: Any) -> dict[str, Any]:
    old = dict(pdb.get('status') or {})
    disrupted = {name: when for name, when in (old.get('disruptedPods') or {}).items()
                 if _still_disrupting(name, when, pods)}
    healthy = sum(1 for p in pods if _ready(p) and not p['metadata'].get('deletionTimestamp')
                  and p['metadata']['name'] not in disrupted)
    expected, desired = _expected_and_desired(pdb.get('spec') or {}, pods, replicas)
    status: dict[str, Any] = {
        'observedGeneration': pdb['metadata'].get('generation', 1),
        'disruptionsAllowed': max(healthy - desired, 0) if expected > 0 else 0,
        'currentHealthy': healthy, 'desiredHealthy': desired, 'expectedPods': expected}
    if disrupted:
        status['disruptedPods'] = disrupted
    status['conditions'] = _allowed_condition(old, status['disruptionsAllowed'] > 0)
    return status


def _expected_and_desired(spec: Mapping[str, Any], pods: list[dict[str, Any]], replicas: Any) -> tuple[int, int]:
    """getExpectedPodCount: minAvailable as a number counts pods, percentages and
    maxUnavailable count the replicas the pods' controllers want."""
    min_available, max_unavailable = spec.get('minAvailable'), spec.get('maxUnavailable')
    if isinstance(min_available, int):
        return len(pods), min_available
    expected = _expected_from_controllers(pods, replicas)
    if max_unavailable is not None:
        return expected, max(expected - _scaled(max_unavailable, expected), 0)
    if min_available is not None:
        return expected, _scaled(min_available, expected)
    return expected, expected


def _expected_from_controllers(pods: list[dict[str, Any]], replicas: Any) -> int:
    counted: dict[str, int] = {}
    for pod in pods:
        ref = next((r for r in pod['metadata'].get('ownerReferences') or [] if r.get('controller')), None)
        scale = replicas(pod['metadata']['namespace'], ref) if ref else None
        if scale is None:
            counted[pod['metadata']['uid']] = 1  # no controller to ask: the pod itself
        else:
            counted[ref['uid']] = scale
    return sum(counted.values())


def _scaled(value: int | str, total: int) -> int:
    """An IntOrString of a budget: a number, or a percentage of ``total`` rounded up."""
    if isinstance(value, str) and value.endswith('%'):
        return math.ceil(int(value[:-1]) * total / 100)
    return int(value)


def _still_disrupting(name: str, when: str, pods: list[dict[str, Any]]) -> bool:
    pod = next((p for p in pods if p['metadata']['name'] == name), None)
    recent = datetime.datetime.now(tz=datetime.UTC) - parse_time(when) < _DISRUPTION_TIMEOUT
    return pod is not None and not pod['metadata'].get('deletionTimestamp') and recent


def _allowed_condition(status: Mapping[str, Any], allowed: bool) -> list[dict[str, Any]]:
    """The DisruptionAllowed condition; its transition time moves only when it flips."""
    wanted = 'True' if allowed else 'False'
    old = next((c for c in status.get('conditions') or [] if c.get('type') == 'DisruptionAllowed'), None)
    since = old['lastTransitionTime'] if old and old.get('status') == wanted else now()
    return [{'type': 'DisruptionAllowed', 'status': wanted, 'reason': 'SufficientPods' if allowed else
             'InsufficientPods', 'message': '', 'lastTransitionTime': since,
             'observedGeneration': status.get('observedGeneration', 0)}]


def _ignores_budgets(pod: Mapping[str, Any]) -> bool:
    """canIgnorePDB: pods not running, or already being deleted."""
    return (pod.get('status') or {}).get('phase') in _NOT_RUNNING or bool(pod['metadata'].get('deletionTimestamp'))


def _evictable_unhealthy(pod: Mapping[str, Any], pdb: Mapping[str, Any]) -> bool:
    """An unready pod goes without spending the budget: always with AlwaysAllow, with the
    default IfHealthyBudget only while the budget has its healthy pods."""
    if _ready(pod):
        return False
    if (pdb.get('spec') or {}).get('unhealthyPodEvictionPolicy') == 'AlwaysAllow':
        return True
    status = pdb.get('status') or {}
    desired = status.get('desiredHealthy', 0)
    return desired > 0 and status.get('currentHealthy', 0) >= desired


def _ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get('status') or {}).get('conditions') or []
    return any(c.get('type') == 'Ready' and c.get('status') == 'True' for c in conditions)


def _selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A metav1.LabelSelector: nil selects nothing, {} everything (policy/v1)."""
    if selector is None:
        return False
    return all(r.matches(labels) for r in LabelRequirement.from_selector(selector))


def _too_many_requests(cause: str, retry_after: int) -> ApiError:
    details: dict[str, Any] = {'causes': [{'reason': 'DisruptionBudget', 'message': cause}]}
    if retry_after:
        details['retryAfterSeconds'] = retry_after
    return ApiError(429, 'TooManyRequests', _BUDGET_VIOLATED, details)
