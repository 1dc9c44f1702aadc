{{/*
The ONE list of what the operator calls on the Kubernetes API, by who calls it
(module/function of operator/dask_memory_operator/, or kopf itself). rbac.yaml renders
it as a ClusterRole (cluster-wide), or as a Role in each of watchNamespaces plus a
ClusterRole of the cluster-scoped part. No wildcard verb, resource or group.

Reading by name (as kr8s does: `DaskWorkerGroup.get(name)`) is a LIST with the field
selector metadata.name=NAME, hence `list` where one might expect `get`. Discovery
(/api, /apis) is granted to every authenticated user by Kubernetes' own
system:discovery role and is not repeated here.
*/}}

{{/* Rules on objects in the watched namespaces. */}}
{{- define "dmo.rules.namespaced" -}}
# kopf: the MemoryPolicy handlers and index (controllers/registry.py: on.create/update/
# resume/delete, the resync and scale timers, memorypolicies_by_namespace) list and
# watch them; kopf patches its finalizer amm.dask.org/restore-schedulers and its
# progress/diffbase annotations (controllers/registry.py configure_operator);
# controllers/scope.py annotates a namespace's policies when its label changes.
# With replicaCount > 1, webhook/handlers.py mutate_pod_among_peers lists a pod's
# namespace's policies for each admission.
- apiGroups: ["amm.dask.org"]
  resources: ["memorypolicies"]
  verbs: ["list", "watch", "patch"]
# kopf, for the handlers' patch.status: controllers/memorypolicy.py _patch_status,
# controllers/scaling.py scale_policy_clusters (the CRD has a status subresource).
- apiGroups: ["amm.dask.org"]
  resources: ["memorypolicies/status"]
  verbs: ["patch"]
# schedulers/locator.py SchedulerLocator._refusal reads a scheduler's DaskCluster by
# name (a list), the end of the scheduler pod's ownership chain.
# kopf: index daskclusters_by_namespace and on.event converge_changed_cluster
# (controllers/daskcluster.py); with replicaCount > 1, webhook/handlers.py
# mutate_pod_among_peers reads a pod's DaskCluster by name (a list). Nothing ever
# writes a DaskCluster.
- apiGroups: ["kubernetes.dask.org"]
  resources: ["daskclusters"]
  verbs: ["list", "watch"]
# kopf: index daskautoscalers_by_cluster (controllers/scaling.py).
- apiGroups: ["kubernetes.dask.org"]
  resources: ["daskautoscalers"]
  verbs: ["list", "watch"]
# dask_memory_operator/watches.py: the operator's cache of every DaskWorkerGroup (a
# list, then a watch), which the scaling passes read (controllers/scaling.py);
# controllers/workergroup.py: read_group (a list by name, when the cache cannot vouch
# for the group) and set_replicas (JSON patch of spec.worker.replicas and the
# scaling-ledger annotation).
- apiGroups: ["kubernetes.dask.org"]
  resources: ["daskworkergroups"]
  verbs: ["list", "watch", "patch"]
# dask_memory_operator/watches.py: the cache of Deployments labelled
# dask.org/cluster-name (a list, then a watch): a cluster's worker Deployments for
# the scaling passes, the scheduler Deployment for schedulers/locator.py's check of the
# scheduler pod's ownership (both read from the API when the cache cannot vouch);
# controllers/workergroup.py delete_deployment: the retired worker's Deployment,
# with a uid precondition.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["list", "watch", "delete"]
# dask_memory_operator/watches.py: the cache of ReplicaSets labelled
# dask.org/cluster-name (a list, then a watch): the scheduler pod's ReplicaSet, the
# link from the pod to the scheduler Deployment (schedulers/locator.py _refusal,
# which reads it by name, a list, when the cache does not hold it).
- apiGroups: ["apps"]
  resources: ["replicasets"]
  verbs: ["list", "watch"]
# dask_memory_operator/watches.py: the cache of Services labelled dask.org/cluster-name
# (a list, then a watch): the scheduler Service's tcp-comm targetPort, read only when
# the scheduler pod names no tcp-comm port (schedulers/locator.py _comm_port, a list
# by name when the cache does not hold it).
- apiGroups: [""]
  resources: ["services"]
  verbs: ["list", "watch"]
# kopf.info/kopf.warn (observability/events.py, controllers/*) and
# observability/events.py post_from_background (kr8s Event.create): core v1 Events.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# dask_memory_operator/watches.py: the cache of Dask pods (a list, then a watch;
# with the webhook on, worker pods too): schedulers/locator.py SchedulerLocator.
# scheduler_pod connects to the cluster's scheduler pod's IP; controllers/scaling.py
# _hooks counts worker pods created without the preStop hook. Both list them
# (by labels) when the cache cannot vouch for them.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
{{- end }}

{{/* Rules only kopf needs, at cluster scope. */}}
{{- define "dmo.rules.cluster" -}}
# kopf (reactor/observation.py resource_observer): watches CRDs to notice the served
# resources appearing or going.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if or .Values.watchNamespaces (include "dmo.namespaceSelector" .) }}
# kopf (reactor/observation.py namespace_observer), only when not cluster-wide: lists
# and watches namespaces to serve the listed ones when they exist. With the namespace
# selector: controllers/scope.py's index of the labelled namespaces and its watch of
# their label.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- if include "dmo.peering" . }}
# kopf peering (replicaCount > 1): kopf watches ClusterKopfPeerings and patches its own
# heartbeat into the release's one (cluster-wide also with watchNamespaces: tenants
# cannot write it).
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["list", "watch"]
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  resourceNames: [{{ include "dmo.peeringName" . | quote }}]
  verbs: ["patch"]
{{- end }}
{{- end }}
