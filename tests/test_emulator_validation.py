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
