{{/*
Names, labels, images and the RBAC rules shared by the templates.
*/}}

{{/* The base of every object's name: 52 characters at most, leaving room for suffixes like -metrics. */}}
{{- define "kubetune.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/*
Cluster-scoped objects (ClusterRoles and their bindings) carry the release namespace in their name,
so that namespace-scoped installs of the same release name in two namespaces do not collide.
*/}}
{{- define "kubetune.clusterName" -}}
{{- printf "%s-%s" (include "kubetune.fullname" .) .Release.Namespace | trunc 253 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubetune.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kubetune
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository[:tag][@digest], the tag defaulting to the chart's appVersion. Call with (list .Values.x $). */}}
{{- define "kubetune.image" -}}
{{- $image := index . 0 -}}
{{- $root := index . 1 -}}
{{- $ref := printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- if $image.digest -}}
{{- $ref = printf "%s@%s" $ref $image.digest -}}
{{- end -}}
{{- $ref -}}
{{- end -}}

{{/* The watched namespaces as a JSON list; empty when the operator watches the whole cluster. */}}
{{- define "kubetune.watchedNamespaces" -}}
{{- if eq .Values.watch.scope "namespaces" -}}
{{- default (list .Release.Namespace) .Values.watch.namespaces | toJson -}}
{{- else -}}
{{- list | toJson -}}
{{- end -}}
{{- end -}}

{{/* The kopf peering name: several replicas use it to keep exactly one of them active. */}}
{{- define "kubetune.peeringName" -}}kubetune{{- end -}}

{{- define "kubetune.ha" -}}
{{- if gt (int .Values.replicaCount) 1 -}}true{{- end -}}
{{- end -}}

{{/* Refuse values that contradict each other, naming the values and the fix. */}}
{{- define "kubetune.validate" -}}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) -}}
{{- fail "metrics.serviceMonitor.enabled is true but metrics.enabled is false: the ServiceMonitor scrapes the operator's metrics endpoint; enable metrics or disable the ServiceMonitor" -}}
{{- end -}}
{{- if and (eq .Values.watch.scope "cluster") .Values.watch.namespaces -}}
{{- fail (printf "watch.namespaces is set (%s) but watch.scope is cluster, which watches every namespace: set watch.scope=namespaces to watch only those, or empty watch.namespaces" (join ", " .Values.watch.namespaces)) -}}
{{- end -}}
{{- if eq (int .Values.metrics.port) 8081 -}}
{{- fail "metrics.port 8081 is taken by kopf's health endpoint (the liveness probe); choose another port, e.g. 8080" -}}
{{- end -}}
{{- if and (not .Values.serviceAccount.create) (not .Values.serviceAccount.name) -}}
{{- fail "serviceAccount.create is false but serviceAccount.name is empty: name the existing ServiceAccount the operator should run as" -}}
{{- end -}}
{{- end -}}

{{/*
What the operator does to cluster-scoped resources, with the reason for each rule. Derived from
kubetune_operator/kube.py (every API call), controller.py and handlers.py (what kopf watches).
*/}}
{{- define "kubetune.rules.clusterScoped" -}}
# Nodes: the controller lists them to see whether claimed or selected nodes are Ready with
# allocatable GPUs; kopf watches them (handlers.node_changed) to wake jobs waiting for nodes.
- apiGroups: [""]
  resources: [nodes]
  verbs: [list, watch]
# Karpenter NodePools (cluster-scoped, one for a job's training nodes, one for its server, one for a
# ModelServer with an instanceType): the controllers apply them server-side (patch; the first apply
# creates the pool, which the apiserver authorizes as create too), list a job's or a server's pools
# by label, and delete them on completion, when serving stops and from the finalizers; the sweeps
# list the operator's pools and delete those whose FineTuneJob or ModelServer is gone.
- apiGroups: [karpenter.sh]
  resources: [nodepools]
  verbs: [list, create, patch, delete]
# Karpenter NodeClaims (made by Karpenter for the pools): read only. The controller lists a pool's
# claims for NodesReady and launch failures, the finalizer lists them to wait until they are gone,
# and kopf watches them to wake the job.
- apiGroups: [karpenter.sh]
  resources: [nodeclaims]
  verbs: [list, watch]
# CRDs: kopf lists and watches them to start serving resources installed after the operator
# (e.g. Karpenter's NodeClaims); without it kopf only scans once, at start-up.
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- if eq .Values.watch.scope "namespaces" }}
# Namespaces (namespace-scoped installs only): kopf lists and watches them to serve a watched
# namespace that is created, or re-created, after the operator started.
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- else if include "kubetune.ha" . }}
# kopf peering (several replicas, cluster-wide): every replica lists and watches the peering
# objects to see whether a live replica of a higher priority works ...
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  verbs: [list, watch]
# ... and patches its keep-alive into the status of its own peering object, only that one.
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  resourceNames: [{{ include "kubetune.peeringName" . }}]
  verbs: [patch]
{{- end }}
{{- end -}}

{{/* What the operator does in the namespaces it watches (a ClusterRole in cluster scope, else a Role in each). */}}
{{- define "kubetune.rules.namespaced" -}}
# FineTuneJobs: kopf lists and watches them (one daemon per job) and patches them to add and
# remove its finalizer and to keep its handler state in annotations.
- apiGroups: [kubetune.io]
  resources: [finetunejobs]
  verbs: [list, watch, patch]
# FineTuneJob status: the controller writes phase, conditions and progress through the status
# subresource (a merge patch).
- apiGroups: [kubetune.io]
  resources: [finetunejobs/status]
  verbs: [patch]
# FineTuneJob finalizers: children carry an owner reference with blockOwnerDeletion, which the
# OwnerReferencesPermissionEnforcement admission plugin allows only to who may update this.
- apiGroups: [kubetune.io]
  resources: [finetunejobs/finalizers]
  verbs: [update]
# ModelServers: kopf lists and watches them (one daemon per server) and patches its handler state and
# its finalizer in (the finalizer deletes a server's NodePool); a job served by one lists it by name
# for the endpoint and whether its adapter is loaded; the sweep lists them to find orphaned pools.
- apiGroups: [kubetune.io]
  resources: [modelservers]
  verbs: [list, watch, patch]
# ModelServer status: replicas and the adapters each holds, a merge patch as for FineTuneJobs.
- apiGroups: [kubetune.io]
  resources: [modelservers/status]
  verbs: [patch]
# ModelServer finalizers: the owner references of its Deployment, Service and adapters ConfigMap.
- apiGroups: [kubetune.io]
  resources: [modelservers/finalizers]
  verbs: [update]
# Training Jobs (Indexed, one per gang attempt) and the publish Job: created once, listed by label,
# patched to toggle spec.suspend (runPolicy.suspend, Kueue) and to record the publish result
# (annotation kubetune.io/result); kopf watches them to wake the job.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [list, watch, create, patch]
# Pods of the Jobs, of the serving Deployment and of ModelServers: listed (phase, rank-0 address,
# exit codes, termination messages, a server replica's address for loading adapters) and watched
# by kopf; never created, changed or deleted.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
# The workspace PVC, the trainer ConfigMap and the headless Service: server-side applied, which is
# a patch that creates the object when it is missing (so create too); never read back or deleted
# (owner references hand them to garbage collection).
- apiGroups: [""]
  resources: [persistentvolumeclaims, configmaps]
  verbs: [create, patch]
# Services: the training one (headless) as above, and the serving one, which is also deleted when
# spec.serving.enabled turns false.
- apiGroups: [""]
  resources: [services]
  verbs: [create, patch, delete]
# The serving Deployment (serving.enabled): server-side applied on every pass, listed by label
# for its ready replicas, watched by kopf to wake the job, deleted when serving is turned off.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [list, watch, create, patch, delete]
# Events on FineTuneJobs: phase changes and restarts from the controller, handler errors from kopf.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# Kueue's Workloads (runPolicy.queueName): the controller lists the Workload of a queued Job, by
# Kueue's job-uid label, to quote why Kueue has not admitted it or why it evicted it.
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [list]
{{- if and (include "kubetune.ha" .) (eq .Values.watch.scope "namespaces") }}
# kopf peering (several replicas, namespace-scoped): every replica lists and watches the peering
# objects of the namespace to see whether a live replica of a higher priority works ...
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [list, watch]
# ... and patches its keep-alive into the status of its own peering object, only that one.
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  resourceNames: [{{ include "kubetune.peeringName" . }}]
  verbs: [patch]
{{- end }}
{{- end -}}
