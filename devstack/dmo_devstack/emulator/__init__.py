"""
A Kubernetes API emulator with the semantics a real kube-apiserver has.

kmock's ``KubernetesEmulator`` (pinned at 0.8) stores objects in memory and serves
them over real HTTP, but it treats objects as plain JSON documents. kubectl, kr8s,
kopf and dask-kubernetes' operator rely on the API server's semantics, so this
subclass serves every request under ``/api`` and ``/apis`` (and ``/version``,
``/openapi``) itself, still storing the objects in kmock's ``objects`` array (with
their version history) and describing resources in kmock's ``resources`` array
(``load_bundled()`` gives the ~70 built-in kinds). kmock's request DSL
(``emulator['get /x'] << ...``) is bypassed for those paths.

Semantics added, each because a client in this project needs it and each as a real
API server behaves (status codes, ``Status`` objects with reason, message and
``details.causes``):

- Server-side metadata: ``uid``, ``resourceVersion`` (one cluster-wide counter),
  ``creationTimestamp``, ``generation`` where Kubernetes tracks it (custom resources,
  CRDs, workloads; 1 on create; bumped only when something but metadata and, with a
  status subresource, status changes), namespace from the URL, ``generateName``,
  ObjectMeta validation (name format, label and annotation syntax and size), 201 on
  create, 409 AlreadyExists / 404 NotFound / 409 Conflict on a stale
  ``resourceVersion``; a no-op write changes nothing (kopf relies on that to avoid
  loops); namespaces must exist (and not be terminating); custom resources refuse a
  PUT without ``resourceVersion``; pod specs are immutable but for images (and the
  few fields Kubernetes allows); the built-in defaults clients read (pod
  ``restartPolicy``, ``terminationGracePeriodSeconds``, workload ``replicas``, port
  ``protocol``, Service ``targetPort``...).
- Writes: PUT (replace), JSON patch (RFC 6902, a failed ``test`` is 422), merge patch
  (RFC 7386), strategic merge patch for built-in kinds (lists merged by their
  Kubernetes merge keys, ``$patch``/``$setElementOrder``/``$retainKeys``/
  ``$deleteFromPrimitiveList`` directives); custom resources refuse it with 415 as a
  real server does; ``$setElementOrder`` orders lists as apimachinery does (Helm's and
  kubectl's three-way patches rely on it). Server-side apply is not emulated (415,
  answered before the object is looked up, as the API server does).
- Protobuf request bodies (``protobuf``) of Secret, ConfigMap, Namespace and
  DeleteOptions (and, from ``auth_protobuf``, TokenRequest and SelfSubjectAccessReview):
  what client-go's typed clientsets send (Helm's release storage, ``kubectl create
  namespace/secret/configmap/token``, ``auth can-i``); answers are JSON. Secrets get their
  ``type`` default (``Opaque``) and ``stringData`` merged into ``data``.
- ``/status`` and ``/scale`` subresources: with a status subresource the main
  endpoint keeps the stored ``.status`` and ``/status`` changes only ``.status``;
  scale maps ``autoscaling/v1`` Scale onto the CRD's ``specReplicasPath`` etc.
- Deletion: finalizers (``deletionTimestamp``, ``generation`` bumped once; removing
  the last finalizer deletes the object: one DELETED event carrying its last stored
  state, no MODIFIED; no new finalizers while deleting), a DELETE answered with a
  ``Status`` or, for pods and services, the deleted object (with the object when it
  stays), pod graceful deletion (a pod bound to a node is kept for its grace period
  until deleted with ``gracePeriodSeconds=0``: the kubelet's job), deletecollection, and a garbage collector through
  ``ownerReferences`` (background and foreground cascade, ``Orphan``), namespace
  deletion (contents first) and CRD deletion (its objects first).
- Watches: ``resourceVersion`` (only later events; a 410 Expired ERROR event when older
  than the kept event log, ``watch_window`` events long, and a 410 for a list
  ``continue`` token that old), ``timeoutSeconds``, label selectors (``=``, ``==``,
  ``!=``, ``in``, ``notin``, exists, ``!``) and field selectors (``metadata.name``,
  ``metadata.namespace``, plus the few per-kind fields a real server supports) on
  list and watch, ADDED/DELETED when a change moves an object into/out of a selector.
  Watch-list watches (``sendInitialEvents=true``, ``resourceVersionMatch=NotOlderThan``,
  as client-go 0.35's reflectors, hence Helm 4's waiters, send them): the current
  objects, then a BOOKMARK annotated ``k8s.io/initial-events-end``; invalid combinations
  are the 422 of ``ListOptions`` validation. With ``allowWatchBookmarks=true``, a
  BOOKMARK (the kind with only ``metadata.resourceVersion``) every
  ``bookmark_interval`` seconds (a minute, as kube-apiserver's watch cache) and one
  when the watch reaches its timeout.
  Lists carry ``kind: <Kind>List``, ``apiVersion`` and ``metadata.resourceVersion``,
  and are paged with ``limit``/``continue`` (the pages show the current objects, at
  the resourceVersion of the first page, not an exact snapshot).
- Discovery (``/api``, ``/apis``, group and version documents, ``/version``, with or
  without a trailing slash) including subresources; CRDs created through the API are
  served at once (names, scope, subresources, short names, printer columns) and get
  ``Established``/``NamesAccepted`` conditions. ``/openapi/v2`` and ``/openapi/v3``
  answer minimal valid documents: enough for kubectl to validate server-side.
- CRDs: only the ``storage: true`` version is served (no CRD here has more than one;
  conversion between versions is not emulated).
- CRD schema handling as the API server does it: pruning of unknown fields (outside
  ``x-kubernetes-preserve-unknown-fields``) and of nulls in non-nullable fields,
  ``default`` values, then validation with the ``jsonschema`` library (Draft 4, the
  dialect of OpenAPI v3.0 schemas) with ``x-kubernetes-int-or-string`` and
  ``nullable`` translated, and ``x-kubernetes-list-type`` ``set``/``map`` uniqueness;
  errors are 422 Invalid with the API server's message form (``Duplicate value: ...``).
  ``fieldValidation=Strict`` refuses unknown fields (400 BadRequest "strict decoding
  error", as real), ``Warn`` answers a ``Warning`` header. ``x-kubernetes-validations``
  (CEL) rules are NOT evaluated.
- Built-in kinds: checked against kube-apiserver 1.36's OpenAPI schemas (from the
  pinned ``kubernetes-validate`` package; a wrong JSON type is the 400 of Go's decoder,
  a missing field a 422), then by the rules of the API server's validation code that
  matter here: port numbers and IANA port names, DNS-1123 container names, service
  ports, a workload's selector matching its template, legacy Event namespaces; for all
  kinds ``ownerReferences`` (complete, at most one controller). Unknown fields of
  built-in kinds are kept (not pruned), and the rest of the validation code is not
  emulated.
- Services get a ``spec.clusterIP`` allocated from a configurable CIDR (default
  127.1.0.0/16, so that a process kubelet can bind it on loopback); headless
  (``None``) stays; the address is immutable and released on deletion.
- kubectl's table output (``Accept: ...;as=Table;g=meta.k8s.io``, lists, gets and
  watches): kube-apiserver's printers for pods, deployments, services and events (the
  kinds one looks at in the sandbox), NAME and AGE for other built-in kinds, a CRD's
  ``additionalPrinterColumns``.
- Watch streams end cleanly when the server stops, so no client hangs on them.
- ``/healthz``, ``/livez``, ``/readyz`` answer ``ok``; ``pods/eviction`` honours the
  PodDisruptionBudget selecting the pod (429 TooManyRequests when it allows no
  disruption) and deletes the pod gracefully; a disruption controller keeps the
  budgets' status, as kube-controller-manager does.
- ServiceAccounts (``serviceaccounts``): every namespace gets a ``default`` one (the
  serviceaccount controller's job); ``serviceaccounts/token`` (TokenRequest) issues
  JWTs signed by the emulator with kube's claims, optionally bound to a Pod, and
  ``validate_service_account_token`` checks them as kube's validator does.
- Authentication (``authn``): a bearer token of the emulator is its service account
  (``system:serviceaccount:NS:NAME``), a refused one is 401 Unauthorized.
- Authorization (``rbac``): kube's RBAC authorizer for those users, at the start of
  every request (watches included): request attributes as kube's RequestInfoFactory,
  ``rule_allows`` (kube's RuleAllows), (Cluster)RoleBindings, kube's 403 messages, the
  bootstrap ClusterRoles of authenticated users as real objects, SelfSubjectAccessReview.
- Audit (``audit``): one ``audit.k8s.io/v1`` Event per request at level Metadata, with
  the authorization decision and reason, in memory and in ``audit_log_path``.

- Mutating admission webhooks (``admission``): ``MutatingWebhookConfiguration`` validated
  and defaulted as the API server does; on CREATE and UPDATE the matching webhooks
  (rules, namespace and object selectors) get an AdmissionReview over HTTPS, verified
  against ``caBundle``, within ``timeoutSeconds``; JSON patch responses are applied
  before validation and storage; denials and call failures (``failurePolicy``) answer
  with the API server's messages.

Not emulated: server-side apply, validating admission webhooks, authentication but
service-account tokens (a request without credentials is the unrestricted admin), TLS
(client-go sends a bearer token only over HTTPS: put a TLS listener in front, as
tests/test_emulator_rbac.py does), TokenReview and SubjectAccessReview, ``pods/binding``,
CEL rules, most of the validation code of built-in kinds, the controllers but the garbage collector,
the serviceaccount controller and the
disruption controller (no Deployment makes a pod: a kubelet's job), CBOR request bodies,
and protobuf bodies of kinds other than those ``protobuf.KINDS`` knows (answered 415):
kubectl's imperative commands for other built-in kinds (``create deployment``,
``expose``, ``run``, ``drain``) send protobuf, so use ``kubectl apply -f`` (JSON)
instead. Helm 4 works with ``--server-side=false`` on install (its default is
server-side apply); upgrade and rollback follow the release's own method.

Where each part lives (modules named by concern):

- ``server``: ``KubeEmulator``, the HTTP entry point and routing of requests;
- ``storage``: objects, the resourceVersion counter, lists and watches;
- ``writes``: create, replace, patch, ``/status`` and ``/scale``;
- ``deletion``: finalizers, graceful deletion, garbage collection;
- ``eviction``: ``pods/eviction`` and the PodDisruptionBudget status;
- ``admission``: mutating admission webhooks and their configurations;
- ``schema``: CRD schema pruning, defaulting and validation;
- ``builtin``: defaults and validation rules of built-in kinds; ``builtin_schema``:
  their OpenAPI schemas;
- ``patches``: JSON, merge and strategic merge patches;
- ``meta``: ObjectMeta fields and syntax; ``selectors``: label and field selectors;
- ``serviceaccounts``: default ServiceAccounts, TokenRequest and token validation;
  ``tokens``: the JWTs they are; ``authn``: who a request is; ``rbac``: what it may do;
  ``audit``: the request front (authentication, authorization) and the audit log;
  ``auth_protobuf``: the protobuf bodies of TokenRequest and SelfSubjectAccessReview;
- ``services``: cluster IP allocation; ``discovery``: discovery and OpenAPI documents;
- ``tables``: kubectl's table output; ``resources``: what is served;
- ``errors``: ``Status`` objects and field errors; ``wire``: request and response bodies;
  ``protobuf``: the protobuf decoder of the kinds above.
"""
from __future__ import annotations

from .errors import ApiError, FieldError
from .jsonpath import eval_jsonpath
from .patches import merge_patch, strategic_merge_patch
from .rbac import RequestAttributes, attributes_of_audit_event, request_attributes, rule_allows
from .resources import ResourceType
from .schema import StructuralSchema
from .selectors import LabelRequirement, parse_field_selector, parse_label_selector
from .server import KubeEmulator
from .tables import human_duration

__all__ = [
    'ApiError', 'FieldError', 'KubeEmulator', 'LabelRequirement', 'RequestAttributes', 'ResourceType',
    'StructuralSchema', 'attributes_of_audit_event', 'eval_jsonpath', 'human_duration', 'merge_patch',
    'parse_field_selector', 'parse_label_selector', 'request_attributes', 'rule_allows', 'strategic_merge_patch',
]
