"""
What the server serves: one ``ResourceType`` per group/version/plural.

Built-in kinds come from kmock's bundled resource list, custom ones from CRDs created
through the API (served at once, as the API server does). A ``ResourceType`` carries
what the handlers need: names for messages, scope, subresources, the CRD schema and
printer columns. ``Target`` is a parsed request path.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import kmock

from .errors import ApiError, FieldError
from .meta import now
from .schema import StructuralSchema

# Built-in kinds whose strategies track metadata.generation (CRs and CRDs always do;
# pods, configmaps, services, namespaces... have no generation in Kubernetes 1.32).
BUILTIN_GENERATION = {('apps', 'deployments'), ('apps', 'replicasets'), ('apps', 'statefulsets'),
                       ('apps', 'daemonsets'), ('batch', 'jobs'), ('batch', 'cronjobs'),
                       ('policy', 'poddisruptionbudgets'), ('networking.k8s.io', 'ingresses'),
                       ('networking.k8s.io', 'networkpolicies'), ('autoscaling', 'horizontalpodautoscalers'),
                       ('', 'replicationcontrollers'), ('apiextensions.k8s.io', 'customresourcedefinitions')}


# Built-in kinds with a scale subresource.
BUILTIN_SCALE = {('apps', 'deployments'), ('apps', 'replicasets'), ('apps', 'statefulsets'),
                  ('', 'replicationcontrollers')}

CRD_RESOURCE = kmock.resource('apiextensions.k8s.io', 'v1', 'customresourcedefinitions')
NAMESPACES = kmock.resource('', 'v1', 'namespaces')
SERVICES = kmock.resource('', 'v1', 'services')
PODS = kmock.resource('', 'v1', 'pods')
SECRETS = kmock.resource('', 'v1', 'secrets')
CONFIGMAPS = kmock.resource('', 'v1', 'configmaps')
SERVICEACCOUNTS = kmock.resource('', 'v1', 'serviceaccounts')
EVENTS = kmock.resource('', 'v1', 'events')
CRD_FINALIZER = 'customresourcecleanup.apiextensions.k8s.io'
VERBS = ['create', 'delete', 'deletecollection', 'get', 'list', 'patch', 'update', 'watch']


@attrs.define
class ResourceType:
    """What the server knows about one group/version/plural."""
    group: str
    version: str
    plural: str
    kind: str
    singular: str
    namespaced: bool
    shortnames: list[str] = attrs.field(factory=list)
    categories: list[str] = attrs.field(factory=list)
    #: Subresources: 'status' and 'scale' have semantics here; others are only listed.
    subresources: set[str] = attrs.field(factory=set)
    #: The CRD version's schema, or None for built-in kinds (not validated).
    schema: StructuralSchema | None = None
    #: Scale subresource paths: specReplicasPath, statusReplicasPath, labelSelectorPath.
    scale: dict[str, str] | None = None
    printer_columns: list[dict[str, Any]] = attrs.field(factory=list)
    #: The CRD's name when it is a custom resource.
    crd: str | None = None

    @property
    def has_generation(self) -> bool:
        return self.crd is not None or (self.group, self.plural) in BUILTIN_GENERATION

    @property
    def resource(self) -> kmock.resource:
        return kmock.resource(self.group, self.version, self.plural)

    @property
    def api_version(self) -> str:
        return f'{self.group}/{self.version}' if self.group else self.version

    @property
    def qualified(self) -> str:
        """``deployments.apps``, ``pods``: the name used in error messages."""
        return f'{self.plural}.{self.group}' if self.group else self.plural

    @property
    def kind_qualified(self) -> str:
        """``Deployment.apps``, ``Pod``: the name used in Invalid messages."""
        return f'{self.kind}.{self.group}' if self.group else self.kind

    def not_found(self, name: str) -> ApiError:
        return ApiError(404, 'NotFound', f'{self.qualified} "{name}" not found',
                        {'name': name, 'group': self.group, 'kind': self.plural})

    def invalid(self, name: str, errors: list[FieldError]) -> ApiError:
        text = str(errors[0]) if len(errors) == 1 else '[' + ', '.join(map(str, errors)) + ']'
        causes = [{'reason': e.type, 'message': e.detail, 'field': e.path} for e in errors]
        return ApiError(422, 'Invalid', f'{self.kind_qualified} "{name}" is invalid: {text}',
                        {'name': name, 'group': self.group, 'kind': self.kind, 'causes': causes})

    def conflict(self, name: str) -> ApiError:
        return ApiError(409, 'Conflict',
                        f'Operation cannot be fulfilled on {self.qualified} "{name}": the object has '
                        f'been modified; please apply your changes to the latest version and try again',
                        {'name': name, 'group': self.group, 'kind': self.plural})



@attrs.define
class Target:
    """A parsed request path."""
    rtype: ResourceType
    namespace: str | None
    name: str | None
    subresource: str | None


def crd_status(crd: Mapping[str, Any]) -> dict[str, Any]:
    """The status the API server's CRD controllers write: names accepted, established."""
    stamp = now()
    names = dict(crd['spec']['names'])
    names.setdefault('singular', names['kind'].lower())
    names.setdefault('listKind', f'{names["kind"]}List')
    return {'acceptedNames': names, 'storedVersions': [
        v['name'] for v in crd['spec']['versions'] if v.get('storage')], 'conditions': [
        {'type': 'NamesAccepted', 'status': 'True', 'reason': 'NoConflicts',
         'message': 'no conflicts found', 'lastTransitionTime': stamp},
        {'type': 'Established', 'status': 'True', 'reason': 'InitialNamesAccepted',
         'message': 'the initial names have been accepted', 'lastTransitionTime': stamp}]}

