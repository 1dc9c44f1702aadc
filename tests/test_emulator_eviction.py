"""
Evictions honour PodDisruptionBudgets, whose status the emulator's disruption
controller keeps, as kube-controller-manager does.
"""
from __future__ import annotations

from typing import Any

from test_emulator import DEPLOYMENTS, Http, deployment, http, owner_ref, server, wait_for

__all__ = ['http', 'server']  # fixtures used here
PODS = '/api/v1/namespaces/default/pods'
PDBS = '/apis/policy/v1/namespaces/default/poddisruptionbudgets'
EVICTION = {'apiVersion': 'policy/v1', 'kind': 'Eviction'}


async def running_pod(http: Http, name: str, owner: dict[str, Any], ready: bool = True) -> None:
    """A pod of the Deployment on a node, running (and Ready), as a kubelet reports it."""
    ref = {**owner_ref(owner), 'controller': True}
    pod = {'metadata': {'name': name, 'labels': {'app': 'web'}, 'ownerReferences': [ref]},
           'spec': {'nodeName': 'n1', 'containers': [{'name': 'c', 'image': 'x'}]}}
    assert (await http.post(PODS, pod))[0] == 201
    status = {'phase': 'Running', 'conditions': [{'type': 'Ready', 'status': 'True' if ready else 'False'}]}
    assert (await http.patch(f'{PODS}/{name}/status', {'status': status}))[0] == 200


async def budget_is(http: Http, name: str, allowed: int) -> bool:
    """The disruption controller has seen the budget's current generation, with this allowance."""
    status, pdb = await http.get(f'{PDBS}/{name}')
    observed = pdb.get('status', {}).get('observedGeneration') == pdb['metadata']['generation']
    return observed and pdb['status']['disruptionsAllowed'] == allowed


async def evict(http: Http, name: str) -> tuple[int, Any]:
    return await http.post(f'{PODS}/{name}/eviction', {**EVICTION, 'metadata': {'name': name}})


async def test_eviction_honours_pod_disruption_budgets(http: Http) -> None:
    _, web = await http.post(DEPLOYMENTS, {**deployment('web'), 'spec': {
        **deployment('web')['spec'], 'replicas': 2, 'selector': {'matchLabels': {'app': 'web'}},
        'template': {'metadata': {'labels': {'app': 'web'}}, 'spec': {'containers': [{'name': 'c', 'image': 'x'}]}}}})
    await running_pod(http, 'p1', web)
    await running_pod(http, 'p2', web)
    pdb = {'metadata': {'name': 'web'}, 'spec': {'minAvailable': 2, 'selector': {'matchLabels': {'app': 'web'}}}}
    assert (await http.post(PDBS, pdb))[0] == 201
    await wait_for(lambda: budget_is(http, 'web', 0))
    status, pdb = await http.get(f'{PDBS}/web')
    assert {k: pdb['status'][k] for k in ('currentHealthy', 'desiredHealthy', 'expectedPods')} == \
        {'currentHealthy': 2, 'desiredHealthy': 2, 'expectedPods': 2}

    status, err = await evict(http, 'p1')
    assert status == 429 and err['reason'] == 'TooManyRequests' and err['code'] == 429
    assert err['message'] == "Cannot evict pod as it would violate the pod's disruption budget."
    assert err['details']['causes'] == [{'reason': 'DisruptionBudget',
                                         'message': 'The disruption budget web needs 2 healthy pods and has 2 '
                                                    'currently'}]
    assert 'deletionTimestamp' not in (await http.get(f'{PODS}/p1'))[1]['metadata']

    await http.patch(f'{PDBS}/web', {'spec': {'minAvailable': 1}})
    await wait_for(lambda: budget_is(http, 'web', 1))
    status, ok = await evict(http, 'p1')
    assert status == 201 and ok['status'] == 'Success'
    assert (await http.get(f'{PODS}/p1'))[1]['metadata']['deletionTimestamp']  # deleted gracefully
    status, pdb = await http.get(f'{PDBS}/web')
    assert pdb['status']['disruptionsAllowed'] == 0  # spent (disruptedPods), then p1 is terminating
    assert (await evict(http, 'p2'))[0] == 429

    # Pods not running (Pending here) are evicted whatever the budget says.
    await http.post(PODS, {'metadata': {'name': 'pending', 'labels': {'app': 'web'}},
                           'spec': {'nodeName': 'n1', 'containers': [{'name': 'c', 'image': 'x'}]}})
    assert (await evict(http, 'pending'))[0] == 201
    assert (await evict(http, 'nope'))[0] == 404


async def test_eviction_of_an_unhealthy_pod(http: Http) -> None:
    _, web = await http.post(DEPLOYMENTS, deployment('web'))
    await running_pod(http, 'sick', web, ready=False)
    await running_pod(http, 'fine', web)
    pdb = {'metadata': {'name': 'web'}, 'spec': {'maxUnavailable': 0, 'selector': {'matchLabels': {'app': 'web'}},
                                                 'unhealthyPodEvictionPolicy': 'AlwaysAllow'}}
    await http.post(PDBS, pdb)
    await wait_for(lambda: budget_is(http, 'web', 0))
    # An unready pod goes with AlwaysAllow; a healthy one does not.
    assert (await evict(http, 'sick'))[0] == 201
    assert (await evict(http, 'fine'))[0] == 429
