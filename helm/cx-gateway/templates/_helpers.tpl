{{/*
Expand the name of the chart.
*/}}
{{- define "cx-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "cx-gateway.fullname" -}}
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

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "cx-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "cx-gateway.labels" -}}
helm.sh/chart: {{ include "cx-gateway.chart" . }}
{{ include "cx-gateway.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels. These also label the StatefulSet's volume claim template, whose metadata is
immutable: keep them free of anything that changes between releases (versions, chart labels).
*/}}
{{- define "cx-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cx-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "cx-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cx-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The headless Service that gives the StatefulSet's pod its stable network identity.
*/}}
{{- define "cx-gateway.headlessServiceName" -}}
{{- printf "%s-headless" (include "cx-gateway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The container image: a digest pins it exactly; otherwise the tag, defaulting to the app version.
*/}}
{{- define "cx-gateway.image" -}}
{{- $repository := .Values.image.repository }}
{{- if .Values.image.registry }}
{{- $repository = printf "%s/%s" .Values.image.registry .Values.image.repository }}
{{- end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
The Secret holding the upstream keys: the operator's own one, or the one this chart renders.
*/}}
{{- define "cx-gateway.secretName" -}}
{{- if .Values.upstreamKeys.existingSecret }}
{{- .Values.upstreamKeys.existingSecret }}
{{- else }}
{{- include "cx-gateway.fullname" . }}
{{- end }}
{{- end }}

{{/*
Whether the pod reads upstream keys at all: the sandbox mode talks to the in-process emulator.
*/}}
{{- define "cx-gateway.usesKeys" -}}
{{- if not .Values.sandbox.enabled }}true{{ end }}
{{- end }}

{{/*
Whether this chart renders its own Secret: for the upstream keys unless they come from
upstreamKeys.existingSecret (or the sandbox needs none), and for the webhook secrets unless they
come from webhook.existingSecret.
*/}}
{{- define "cx-gateway.managedSecret" -}}
{{- if or (and (include "cx-gateway.usesKeys" .) (not .Values.upstreamKeys.existingSecret)) (and .Values.webhook.enabled (not .Values.webhook.existingSecret)) }}true{{ end }}
{{- end }}

{{/*
The Secret holding the webhook secrets: the operator's own one, or the one this chart renders.
*/}}
{{- define "cx-gateway.webhookSecretName" -}}
{{- if .Values.webhook.existingSecret }}
{{- .Values.webhook.existingSecret }}
{{- else }}
{{- include "cx-gateway.fullname" . }}
{{- end }}
{{- end }}

{{/*
The guard of every object that exposes the webhook path outside the cluster: without a shared
secret the receiver is off, and a webhook must never be exposed unauthenticated. Call with
(dict "ctx" $ "value" "ingress.enabled").
*/}}
{{- define "cx-gateway.requireWebhookSecret" -}}
{{- $webhook := .ctx.Values.webhook }}
{{- if not (and $webhook.enabled (or $webhook.existingSecret $webhook.secret)) }}
{{- fail (printf "%s exposes %s, but no webhook secret is configured: an unauthenticated webhook must not be exposed. Set webhook.enabled=true with webhook.existingSecret (or webhook.secret), or turn %s off" .value (include "cx-gateway.webhookPath" .ctx) .value) }}
{{- end }}
{{- end }}

{{/*
The only path the gateway's webhook receiver answers on; Ingress and HTTPRoute expose nothing else
of the admin port (which also serves /livez, /readyz and /metrics).
*/}}
{{- define "cx-gateway.webhookPath" -}}
/webhooks/retently
{{- end }}

{{/*
Where the key files are mounted; the *_FILE variables point into it.
*/}}
{{- define "cx-gateway.secretsDir" -}}
/etc/cx-gateway/secrets
{{- end }}

{{/*
How long Kubernetes waits between SIGTERM and SIGKILL: the preStop pause, the gateway's drain delay
(CXGW_DRAIN_DELAY, NOT_SERVING while still serving), its drain window (CXGW_SHUTDOWN_GRACE) and a
margin for closing the store, so a clean drain is never cut.
*/}}
{{- define "cx-gateway.terminationGracePeriodSeconds" -}}
{{- add (.Values.lifecycle.preStopSleepSeconds | int64) (.Values.drain.delaySeconds | int64) (.Values.config.shutdownGraceSeconds | int64) (.Values.lifecycle.terminationGraceMarginSeconds | int64) }}
{{- end }}

{{/*
The label a client pod carries to reach the gateway when networkPolicy.allowExternal is false.
*/}}
{{- define "cx-gateway.clientLabel" -}}
{{- printf "%s-client" (include "cx-gateway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Where the callers file, the server certificate, the client CA bundle, the webhook secrets and the
alert rules (with their secret files) are mounted (read-only).
*/}}
{{- define "cx-gateway.callersDir" -}}
/etc/cx-gateway/callers
{{- end }}
{{- define "cx-gateway.rulesDir" -}}
/etc/cx-gateway/rules
{{- end }}
{{- define "cx-gateway.tlsDir" -}}
/etc/cx-gateway/tls
{{- end }}
{{- define "cx-gateway.clientCaDir" -}}
/etc/cx-gateway/client-ca
{{- end }}
{{- define "cx-gateway.webhookDir" -}}
/etc/cx-gateway/webhook
{{- end }}
{{- define "cx-gateway.alertsDir" -}}
/etc/cx-gateway/alerts
{{- end }}

{{- /* Where the Segment write key files are mounted (callers' segment_write_key_files). */}}
{{- define "cx-gateway.segmentKeysDir" -}}
/etc/cx-gateway/segment
{{- end }}

{{/*
A probe: native gRPC health on the grpc port, or the admin port's HTTP endpoints when the gRPC
port speaks TLS (kubelet's gRPC probes cannot). Call with (dict "ctx" $ "probe" .Values.xProbe
"path" "/livez").
*/}}
{{- define "cx-gateway.probeHandler" -}}
{{- if .ctx.Values.tls.secretName }}
httpGet:
  path: {{ .path }}
  port: http
{{- else }}
grpc:
  port: {{ .ctx.Values.containerPorts.grpc }}
  {{- with .probe.service }}
  service: {{ . | quote }}
  {{- end }}
{{- end }}
{{- end }}

{{/*
PromQL label matchers selecting this release's series (monitoring.selector, or the namespace and
the job the ServiceMonitor gives them).
*/}}
{{- define "cx-gateway.metricsSelector" -}}
{{- if .Values.monitoring.selector }}
{{- .Values.monitoring.selector }}
{{- else }}
{{- printf "namespace=%q, job=%q" .Release.Namespace (include "cx-gateway.fullname" .) }}
{{- end }}
{{- end }}
