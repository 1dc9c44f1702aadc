"""
Validation as a real kube-apiserver does it: CRD list types and built-in kinds.

Each test runs the emulator over real HTTP (see test_emulator.py for the helpers).
"""
from __future__ import annotations

import copy
from typing import Any

from test_emulator import CRDS, WIDGET_CRD, WIDGETS, Http, http, server, widget

__all__ = ['http', 'server']  # fixtures used here


def listed_crd() -> dict[str, Any]:
    """The test Widget CRD with list-type map and set fields."""
    crd = copy.deepcopy(WIDGET_CRD)
    schema = crd['spec']['versions'][0]['schema']['openAPIV3Schema']['properties']
    schema['spec']['properties']['labels'] = {
        'type': 'array', 'x-kubernetes-list-type': 'set', 'items': {'type': 'string'}}
    schema['spec']['properties']['ports'] = {
        'type': 'array', 'x-kubernetes-list-type': 'map', 'x-kubernetes-list-map-keys': ['port', 'protocol'],
        'items': {'type': 'object', 'required': ['port'], 'properties': {
            'port': {'type': 'integer'}, 'protocol': {'type': 'string', 'default': 'TCP'}}}}
    schema['status'] = {'type': 'object', 'properties': {'conditions': {
        'type': 'array', 'x-kubernetes-list-type': 'map', 'x-kubernetes-list-map-keys': ['type'],
        'items': {'type': 'object', 'required': ['type'], 'properties': {
            'type': {'type': 'string'}, 'status': {'type': 'string'}}}}}}
    return crd


async def test_list_type_map_and_set_on_custom_resources(http: Http) -> None:
    assert (await http.post(CRDS, listed_crd()))[0] == 201
    status, err = await http.post(WIDGETS, widget('w', labels=['a', 'b', 'a']))
    assert status == 422 and err['reason'] == 'Invalid'
    assert err['message'] == 'Widget.example.com "w" is invalid: spec.labels[2]: Duplicate value: "a"'
    assert err['details']['causes'] == [{'reason': 'FieldValueDuplicate', 'field': 'spec.labels[2]',
                                         'message': 'Duplicate value: "a"'}]
    # Map keys are compared after defaulting (protocol TCP).
    status, err = await http.post(WIDGETS, widget('w', ports=[{'port': 80}, {'port': 80, 'protocol': 'TCP'}]))
    assert status == 422 and err['message'] == ('Widget.example.com "w" is invalid: spec.ports[1]: Duplicate value: '
                                                '{"port":80,"protocol":"TCP"}')
    status, w = await http.post(WIDGETS, widget('w', labels=['a', 'b'], ports=[{'port': 80}, {'port': 81}]))
    assert status == 201
    # Two status conditions of the same type.
    conditions = [{'type': 'Ready', 'status': 'True'}, {'type': 'Ready', 'status': 'False'}]
    status, err = await http.patch(WIDGETS + '/w/status', {'status': {'conditions': conditions}})
    assert status == 422 and err['message'] == ('Widget.example.com "w" is invalid: status.conditions[1]: Duplicate '
                                                'value: {"type":"Ready"}')
    status, w = await http.patch(WIDGETS + '/w/status', {'status': {'conditions': conditions[:1]}})
    assert status == 200 and w['status']['conditions'] == conditions[:1]


PODS = '/api/v1/namespaces/default/pods'
SERVICES = '/api/v1/namespaces/default/services'
DEPLOYMENTS = '/apis/apps/v1/namespaces/default/deployments'
EVENTS = '/api/v1/namespaces/default/events'
CONFIGMAPS = '/api/v1/namespaces/default/configmaps'
LABEL_MSG = ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must "
             "start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for "
             "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')")


def pod(**container: Any) -> dict[str, Any]:
    return {'metadata': {'name': 'p'}, 'spec': {'containers': [{'name': 'c', 'image': 'x', **container}]}}


async def invalid(http: Http, path: str, body: dict[str, Any]) -> str:
    """POST a body the server must refuse with 422; the message."""
    status, err = await http.post(path, body)
    assert status == 422 and err['reason'] == 'Invalid', err
    return err['message']


async def test_malformed_pods_are_refused(http: Http) -> None:
    # A wrong JSON type fails decoding: 400, Go's message.
    status, err = await http.post(PODS, pod(ports=[{'containerPort': '80'}]))
    assert status == 400 and err['reason'] == 'BadRequest'
    assert err['message'] == ('Pod in version "v1" cannot be handled as a Pod: json: cannot unmarshal string into Go '
                              'struct field ContainerPort.spec.containers.ports.containerPort of type int32')
    status, err = await http.post(PODS, {'metadata': {'name': 'p'}, 'spec': {'containers': 'c'}})
    assert status == 400 and 'of type []v1.Container' in err['message']
    # Validation: 422 with the field errors of the API server.
    assert await invalid(http, PODS, {'metadata': {'name': 'p'}, 'spec': {}}) == \
        'Pod "p" is invalid: spec.containers: Required value'
    assert await invalid(http, PODS, pod(image=None)) == 'Pod "p" is invalid: spec.containers[0].image: Required value'
    assert await invalid(http, PODS, pod(name='Bad_Name')) == \
        f'Pod "p" is invalid: spec.containers[0].name: Invalid value: "Bad_Name": {LABEL_MSG}'
    assert await invalid(http, PODS, pod(ports=[{'containerPort': 70000}])) == (
        'Pod "p" is invalid: spec.containers[0].ports[0].containerPort: Invalid value: 70000: must be between 1 and '
        '65535, inclusive')
    message = await invalid(http, PODS, pod(ports=[{'containerPort': 80, 'name': 'HTTP--web-interface'}]))
    assert message == ('Pod "p" is invalid: [spec.containers[0].ports[0].name: Invalid value: "HTTP--web-interface": '
                       'must be no more than 15 characters, spec.containers[0].ports[0].name: Invalid value: '
                       '"HTTP--web-interface": must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-), '
                       'spec.containers[0].ports[0].name: Invalid value: "HTTP--web-interface": must not contain '
                       'consecutive hyphens]')
    assert await invalid(http, PODS, pod(ports=[{'containerPort': 80, 'protocol': 'HTTP'}])) == (
        'Pod "p" is invalid: spec.containers[0].ports[0].protocol: Unsupported value: "HTTP": supported values: '
        '"SCTP", "TCP", "UDP"')
    twice = pod()
    twice['spec']['containers'].append({'name': 'c', 'image': 'y'})
    assert await invalid(http, PODS, twice) == 'Pod "p" is invalid: spec.containers[1].name: Duplicate value: "c"'
    # A good pod, its ports defaulted as the API server does.
    status, ok = await http.post(PODS, pod(ports=[{'containerPort': 8786, 'name': 'tcp-comm'}]))
    assert status == 201 and ok['spec']['containers'][0]['ports'][0]['protocol'] == 'TCP'
    # Status writes are checked too (the kubelet's patches).
    status, err = await http.patch(PODS + '/p/status', {'status': {'containerStatuses': [{'name': 'c', 'ready': 'yes'}]}})
    assert status == 400 and 'of type bool' in err['message']


async def test_malformed_services_are_refused(http: Http) -> None:
    assert await invalid(http, SERVICES, {'metadata': {'name': 's'}, 'spec': {}}) == \
        'Service "s" is invalid: spec.ports: Required value'
    # targetPort defaults to the port, so it is wrong too.
    assert await invalid(http, SERVICES, {'metadata': {'name': 's'}, 'spec': {'ports': [{'port': 0}]}}) == (
        'Service "s" is invalid: [spec.ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive, '
        'spec.ports[0].targetPort: Invalid value: 0: must be between 1 and 65535, inclusive]')
    two = {'metadata': {'name': 's'}, 'spec': {'ports': [{'name': 'a', 'port': 1}, {'port': 2}]}}
    assert await invalid(http, SERVICES, two) == 'Service "s" is invalid: spec.ports[1].name: Required value'
    named = {'metadata': {'name': 's'}, 'spec': {'ports': [{'port': 1, 'targetPort': 'not_iana'}]}}
    assert await invalid(http, SERVICES, named) == (
        'Service "s" is invalid: spec.ports[0].targetPort: Invalid value: "not_iana": must contain only alpha-numeric '
        'characters (a-z, 0-9), and hyphens (-)')
    assert await invalid(http, SERVICES, {'metadata': {'name': 's'}, 'spec': {'type': 'Magic', 'clusterIP': 'None'}}) \
        == ('Service "s" is invalid: spec.type: Unsupported value: "Magic": supported values: "ClusterIP", '
            '"ExternalName", "LoadBalancer", "NodePort"')
    message = await invalid(http, SERVICES, {'metadata': {'name': '1st'}, 'spec': {'clusterIP': 'None'}})
    assert message.startswith('Service "1st" is invalid: metadata.name: Invalid value: "1st": a DNS-1035 label')
    status, svc = await http.post(SERVICES, {'metadata': {'name': 's'}, 'spec': {
        'ports': [{'name': 'tcp-comm', 'port': 8786, 'targetPort': 'tcp-comm'}, {'name': 'http-dashboard',
                                                                                'port': 8787}]}})
    assert status == 201


async def test_malformed_deployments_are_refused(http: Http) -> None:
    template = {'metadata': {'labels': {'app': 'web'}}, 'spec': {'containers': [{'name': 'c', 'image': 'x'}]}}
    def dep(**spec: Any) -> dict[str, Any]:
        return {'metadata': {'name': 'd'}, 'spec': {'selector': {'matchLabels': {'app': 'web'}},
                                                    'template': template, **spec}}
    status, err = await http.post(DEPLOYMENTS, dep(replicas='two'))
    assert status == 400 and err['message'] == (
        'Deployment in version "v1" cannot be handled as a Deployment: json: cannot unmarshal string into Go struct '
        'field DeploymentSpec.spec.replicas of type int32')
    assert await invalid(http, DEPLOYMENTS, {'metadata': {'name': 'd'}, 'spec': {'template': template}}) == \
        'Deployment.apps "d" is invalid: spec.selector: Required value'
    assert await invalid(http, DEPLOYMENTS, dep(replicas=-1)) == \
        'Deployment.apps "d" is invalid: spec.replicas: Invalid value: -1: must be greater than or equal to 0'
    assert await invalid(http, DEPLOYMENTS, dep(selector={'matchLabels': {'app': 'db'}})) == (
        'Deployment.apps "d" is invalid: spec.template.metadata.labels: Invalid value: {"app":"web"}: `selector` does '
        'not match template `labels`')
    never = {**template, 'spec': {**template['spec'], 'restartPolicy': 'Never'}}
    assert await invalid(http, DEPLOYMENTS, dep(template=never)) == (
        'Deployment.apps "d" is invalid: spec.template.spec.restartPolicy: Unsupported value: "Never": supported '
        'values: "Always"')
    status, ok = await http.post(DEPLOYMENTS, dep())
    assert status == 201 and ok['spec']['template']['spec']['restartPolicy'] == 'Always'  # defaulted


async def test_malformed_events_and_owner_references_are_refused(http: Http) -> None:
    event = {'metadata': {'name': 'e'}, 'reason': 'Started', 'involvedObject': {'kind': 'Pod', 'name': 'p',
                                                                              'namespace': 'other'}}
    assert await invalid(http, EVENTS, event) == \
        'Event "e" is invalid: involvedObject.namespace: Invalid value: "other": does not match event.namespace'
    assert await invalid(http, EVENTS, {'metadata': {'name': 'e'}}) == 'Event "e" is invalid: involvedObject: Required value'
    # An event of the new style (eventTime) names its reporter.
    new_style = {**event, 'involvedObject': {**event['involvedObject'], 'namespace': 'default'},
                 'eventTime': '2026-01-01T00:00:00.000000Z'}
    assert await invalid(http, EVENTS, new_style) == ('Event "e" is invalid: [reportingComponent: Required value, '
                                                      'reportingInstance: Required value, action: Required value]')
    ok = {**new_style, 'reportingComponent': 'kopf', 'reportingInstance': 'dev', 'action': 'Action?'}
    assert (await http.post(EVENTS, ok))[0] == 201

    ref = {'apiVersion': 'v1', 'kind': 'ConfigMap', 'name': 'a', 'uid': 'u1', 'controller': True}
    two = [ref, {**ref, 'name': 'b', 'uid': 'u2'}]
    assert await invalid(http, CONFIGMAPS, {'metadata': {'name': 'c', 'ownerReferences': two}}) == (
        'ConfigMap "c" is invalid: metadata.ownerReferences: Invalid value: [{"apiVersion":"v1","kind":"ConfigMap",'
        '"name":"a","uid":"u1","controller":true},{"apiVersion":"v1","kind":"ConfigMap","name":"b","uid":"u2",'
        '"controller":true}]: Only one reference can have Controller set to true. Found "true" in references for '
        'ConfigMap/a and ConfigMap/b')
    assert await invalid(http, CONFIGMAPS, {'metadata': {'name': 'c', 'ownerReferences': [{**ref, 'uid': ''}]}}) == \
        'ConfigMap "c" is invalid: metadata.ownerReferences.uid: Invalid value: "": uid must not be empty'
    # Custom resources too: ownerReferences are ObjectMeta.
    assert (await http.post(CRDS, WIDGET_CRD))[0] == 201
    message = await invalid(http, WIDGETS, {**widget('w'), 'metadata': {'name': 'w', 'ownerReferences': two}})
    assert 'Only one reference can have Controller set to true' in message
