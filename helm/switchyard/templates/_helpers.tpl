{{/*
Names and labels, as `helm create` makes them.
*/}}
{{- define "switchyard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "switchyard.fullname" -}}
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

{{- define "switchyard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- /* The server's pods; the bootstrap-key Job's pod has another component,
so the Service, the PodDisruptionBudget and the Job's own affinity tell
them apart. */}}
{{- define "switchyard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{- define "switchyard.labels" -}}
helm.sh/chart: {{ include "switchyard.chart" . }}
{{ include "switchyard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "switchyard.jobLabels" -}}
helm.sh/chart: {{ include "switchyard.chart" . }}
app.kubernetes.io/name: {{ include "switchyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: bootstrap-key
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "switchyard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "switchyard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "switchyard.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "switchyard.claimName" -}}
{{- default (printf "%s-data" (include "switchyard.fullname" .)) .Values.database.sqlite.persistence.existingClaim }}
{{- end }}

{{/*
The combinations the chart refuses, each with what to do instead. Included
by the Deployment, so every render checks them.
*/}}
{{- define "switchyard.validate" -}}
{{- $mode := .Values.database.mode }}
{{- if eq $mode "sqlite" }}
{{- if ne (int .Values.replicaCount) 1 }}
{{- fail "database.mode=sqlite runs exactly one replica (replicaCount: 1): the SQLite file is on one ReadWriteOnce volume. For several replicas use database.mode=postgres." }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- fail "autoscaling.enabled needs database.mode=postgres: in SQLite mode switchyard runs exactly one replica." }}
{{- end }}
{{- else if eq $mode "postgres" }}
{{- if not .Values.database.postgres.existingSecret }}
{{- fail "database.mode=postgres needs database.postgres.existingSecret: the name of an existing Secret holding the URL (postgres://USER:PASSWORD@HOST:5432/DATABASE) under database.postgres.secretKey." }}
{{- end }}
{{- $_ := include "switchyard.poolSize" . }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas may not exceed autoscaling.maxReplicas." }}
{{- end }}
{{- range $k, $_ := .Values.podLabels }}
{{- if hasPrefix "app.kubernetes.io/" $k }}
{{- fail (printf "podLabels may not set %s: the chart's selector uses the app.kubernetes.io/ labels." $k) }}
{{- end }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled: the ServiceMonitor scrapes the metrics port." }}
{{- end }}
{{- /* A variable the chart sets from its values may not be set again through
extraEnv: the second would win silently, and terminationGracePeriodSeconds
is computed from shutdown.graceSeconds. */}}
{{- $managed := list "SWITCHYARD_LISTEN" "SWITCHYARD_DATABASE_URL" "SWITCHYARD_LOG_FORMAT" "SWITCHYARD_SHUTDOWN_GRACE_SECONDS" "SWITCHYARD_SECRETS_DIR" "SWITCHYARD_OEM_URL_ALLOW" "SWITCHYARD_WEBHOOK_URL_ALLOW" "SWITCHYARD_METRICS_LISTEN" }}
{{- if eq .Values.database.mode "postgres" }}
{{- $managed = append $managed "SWITCHYARD_DATABASE_MAX_CONNECTIONS" }}
{{- end }}
{{- range .Values.extraEnv }}
{{- if has .name $managed }}
{{- fail (printf "extraEnv may not set %s: the chart sets it from its values (see the chart's README, \"Values\")." .name) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The server's shutdown bound: on SIGTERM it waits up to the grace for running
calls, then up to the grace again for the dispatcher, and again for webhook
deliveries (docs/operations.md, "Health and graceful shutdown"). The preStop
sleep runs before SIGTERM and counts against the same period.
*/}}
{{- define "switchyard.terminationGracePeriodSeconds" -}}
{{- $s := .Values.shutdown }}
{{- add (mul 3 (int $s.graceSeconds)) (int $s.preStopSleepSeconds) (int $s.marginSeconds) }}
{{- end }}

{{/*
PostgreSQL: each replica's pool (--database-max-connections), so that the
most pods that run at once stay within database.postgres.connectionBudget.
Each pod holds its pool and one connection for its health check. The most
pods: autoscaling.maxReplicas (or replicaCount), plus a rolling update's
surge (Kubernetes' default maxSurge, 25 % rounded up), plus as many again
still terminating (a Deployment does not count them, and they keep their
connections through their grace period). Fails when the budget cannot be
kept.
*/}}
{{- define "switchyard.poolSize" -}}
{{- $pg := .Values.database.postgres }}
{{- $replicas := ternary (int .Values.autoscaling.maxReplicas) (int .Values.replicaCount) .Values.autoscaling.enabled }}
{{- $pods := add $replicas (mul 2 (div (add $replicas 3) 4)) }}
{{- $budget := int $pg.connectionBudget }}
{{- $size := int $pg.poolSize }}
{{- if eq $size 0 }}
{{- $size = min 16 (sub (div $budget $pods) 1) }}
{{- if lt $size 4 }}
{{- fail (printf "database.postgres.connectionBudget %d cannot give %d pods (replicas, and a rolling update's extra and terminating pods) a pool of at least 4 connections each (and one for the health check): raise it to %d or more, or run fewer replicas." $budget $pods (mul $pods 5)) }}
{{- end }}
{{- else if gt (mul $pods (add $size 1)) $budget }}
{{- fail (printf "database.postgres.poolSize %d: %d pods (replicas, and a rolling update's extra and terminating pods) would hold %d connections (pool and health check), over database.postgres.connectionBudget %d." $size $pods (mul $pods (add $size 1)) $budget) }}
{{- else if lt $size 4 }}
{{- fail (printf "database.postgres.poolSize %d: the server needs at least 4." $size) }}
{{- end }}
{{- $size }}
{{- end }}

{{/*
Where the database is, for the server and for the bootstrap-key Job alike.
*/}}
{{- define "switchyard.databaseEnv" -}}
{{- if eq .Values.database.mode "postgres" }}
- name: SWITCHYARD_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.postgres.existingSecret }}
      key: {{ .Values.database.postgres.secretKey }}
{{- else }}
- name: SWITCHYARD_DATABASE_URL
  value: "sqlite:///data/switchyard.db"
{{- end }}
{{- end }}
