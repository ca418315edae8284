{{/* The release's full name: the release name, with the chart's unless it has it. */}}
{{- define "difftrain.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "difftrain.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "difftrain.labels" -}}
{{ include "difftrain.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "difftrain.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "difftrain.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* An image reference from {repository, tag}; the tag defaults to the appVersion. */}}
{{- define "difftrain.image" -}}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) -}}
{{- end -}}

{{/* A map as a JSON object of strings (quantities may be numbers in values). */}}
{{- define "difftrain.stringMap" -}}
{{- $strings := dict -}}
{{- range $key, $value := . -}}
{{- $_ := set $strings $key (toString $value) -}}
{{- end -}}
{{- toJson $strings -}}
{{- end -}}

{{/*
What the operator does, and nothing more (a test compares these rules with the API
requests the operator makes): it reads and watches its jobs, writes their status and
deletes finished ones (TTL); creates, changes and deletes each attempt's Job; creates
its ConfigMap and Service by server-side apply (which needs create and patch); watches
pods; and posts Events.
*/}}
{{- define "difftrain.rules" -}}
- apiGroups: ["difftrain.io"]
  resources: ["diffusiontrainingjobs"]
  verbs: ["get", "list", "watch", "delete"]
- apiGroups: ["difftrain.io"]
  resources: ["diffusiontrainingjobs/status"]
  verbs: ["patch"]
# Children set blockOwnerDeletion on their owner reference to the job; where the
# OwnerReferencesPermissionEnforcement admission plugin runs, that needs this right.
- apiGroups: ["difftrain.io"]
  resources: ["diffusiontrainingjobs/finalizers"]
  verbs: ["update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# get and delete: a ConfigMap or Service an earlier job of the same name left behind is
# deleted, never taken over.
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
{{- if .Values.networkPolicy.enabled }}
# Each job's NetworkPolicy: created and updated by server-side apply; get and delete for
# one an earlier job of the same name left behind.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create", "patch", "delete"]
{{- end }}
# What Kueue says of a queued job: whether its LocalQueue exists, and why its Workload
# waits (quota, an inactive ClusterQueue). Harmless where Kueue is not installed.
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["localqueues"]
  verbs: ["get"]
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list"]
# create: the job's own Events; list: the Job controller's FailedCreate Events, which say
# why the API server refuses a job's pods (quota, a missing ServiceAccount, Pod Security).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
{{- end -}}
