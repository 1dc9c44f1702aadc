{{/* The chart's name, or nameOverride. */}}
{{- define "dmo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object's name: <release>-<chart>, or fullnameOverride. */}}
{{- define "dmo.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dmo.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "dmo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "dmo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dmo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The operator's pods (not the test pod, which has the release's labels too). */}}
{{- define "dmo.operatorSelectorLabels" -}}
{{ include "dmo.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "dmo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dmo.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "dmo.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The kopf peering of this release (replicaCount > 1): never `default`, dask-kubernetes'. */}}
{{- define "dmo.peeringName" -}}
{{- $name := include "dmo.fullname" . }}
{{- if eq $name "default" }}
{{- fail "the release's peering would be named `default`, the dask-kubernetes operator's: choose another release name or fullnameOverride" }}
{{- end }}
{{- $name }}
{{- end }}

{{- define "dmo.peering" -}}
{{- gt (int .Values.replicaCount) 1 | ternary "true" "" }}
{{- end }}

{{/* The namespace label the operator acts on, LABEL=VALUE, when in effect: without
watchNamespaces (a list of names is the admin's choice already). Empty: none. */}}
{{- define "dmo.namespaceSelector" -}}
{{- if not .Values.watchNamespaces }}{{ .Values.namespaceSelector | default "" }}{{ end }}
{{- end }}

{{/* ValidatingAdmissionPolicy served (admissionregistration.k8s.io/v1, GA in 1.30):
discovery says so on install; `helm template` knows only group/versions, so its
--kube-version (default: Helm's own) decides there. */}}
{{- define "dmo.admissionPolicy" -}}
{{- if and .Values.admissionPolicy.enabled (or (.Capabilities.APIVersions.Has "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy") (semverCompare ">=1.30.0-0" .Capabilities.KubeVersion.Version)) }}true{{ end }}
{{- end }}

{{/* The Services: the operator's ports (health, metrics) and the webhook's. */}}
{{- define "dmo.serviceName" -}}
{{- include "dmo.fullname" . }}
{{- end }}
{{- define "dmo.webhookServiceName" -}}
{{- printf "%s-webhook" (include "dmo.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "dmo.webhookSecretName" -}}
{{- printf "%s-webhook-tls" (include "dmo.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "dmo.webhookCertificateName" -}}
{{- printf "%s-webhook" (include "dmo.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fixed in-pod paths and ports; the cert dir stays literal in the args (the dev
stack's kubelet maps a Secret's mountPath found in the args to its own folder). */}}
{{- define "dmo.certDir" -}}/etc/dask-memory-operator/webhook-certs{{- end }}
{{/* Where the CA of the API server's webhook client certificate is mounted. */}}
{{- define "dmo.clientCADir" -}}/etc/dask-memory-operator/webhook-client-ca{{- end }}
{{- define "dmo.healthPort" -}}8081{{- end }}
{{- define "dmo.metricsPort" -}}8080{{- end }}
{{- define "dmo.webhookPort" -}}9443{{- end }}

{{/* `dask-memory-operator run`'s arguments, from the values. */}}
{{- define "dmo.args" -}}
- run
{{- if .Values.watchNamespaces }}
{{- range .Values.watchNamespaces }}
- --namespace
- {{ . | quote }}
{{- end }}
{{- else }}
- --all-namespaces
{{- with include "dmo.namespaceSelector" . }}
- --namespace-selector
- {{ . | quote }}
{{- end }}
{{- end }}
- --scheduler-access
- pod-ip
- --resync-interval
- {{ .Values.resyncInterval | toString | quote }}
- --liveness
- "http://0.0.0.0:{{ include "dmo.healthPort" . }}/healthz"
{{- if .Values.metrics.enabled }}
- --metrics-address
- "0.0.0.0"
- --metrics-port
- {{ include "dmo.metricsPort" . | quote }}
{{- end }}
{{- if .Values.webhook.enabled }}
- --webhook-port
- {{ include "dmo.webhookPort" . | quote }}
- --webhook-address
- "0.0.0.0"
- --webhook-cert-dir
- {{ include "dmo.certDir" . }}
{{- if .Values.webhook.clientAuth.enabled }}
- --webhook-client-ca
- {{ include "dmo.clientCADir" . }}/ca.crt
{{- range .Values.webhook.clientAuth.names }}
- --webhook-client-name
- {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- range .Values.allowPolicyClasses }}
- --allow-policy-class
- {{ . | quote }}
{{- end }}
{{- if include "dmo.peering" . }}
- --peering
- {{ include "dmo.peeringName" . | quote }}
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* The security contexts, shared by the operator and the test pod. */}}
{{- define "dmo.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}
{{- define "dmo.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}
