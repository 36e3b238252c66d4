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
Whether the store is the shared PostgreSQL database (store.mode "postgres"): several replicas, a
Deployment, nothing durable on the pod.
*/}}
{{- define "cx-gateway.postgres" -}}
{{- if eq .Values.store.mode "postgres" }}true{{ end }}
{{- end }}

{{/*
The workload kind: a StatefulSet for the embedded store (one writer, its own volume), a
Deployment for the PostgreSQL mode (interchangeable replicas). The HPA targets the same kind.
*/}}
{{- define "cx-gateway.workloadKind" -}}
{{- if include "cx-gateway.postgres" . }}Deployment{{ else }}StatefulSet{{ end }}
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
upstreamKeys.existingSecret (or the sandbox needs none), for the webhook secrets unless they
come from webhook.existingSecret, and for the database URL in the PostgreSQL mode unless it comes
from store.postgres.existingSecret.
*/}}
{{- define "cx-gateway.managedSecret" -}}
{{- if or (and (include "cx-gateway.usesKeys" .) (not .Values.upstreamKeys.existingSecret)) (and .Values.webhook.enabled (not .Values.webhook.existingSecret)) (include "cx-gateway.managedPostgresUrl" .) }}true{{ end }}
{{- end }}

{{/*
Whether the chart's own Secret holds the database URL (store.postgres.url).
*/}}
{{- define "cx-gateway.managedPostgresUrl" -}}
{{- if and (include "cx-gateway.postgres" .) (not .Values.store.postgres.existingSecret) }}true{{ end }}
{{- end }}

{{/*
The Secret holding the database URL: the operator's own one, or the one this chart renders.
*/}}
{{- define "cx-gateway.postgresSecretName" -}}
{{- if .Values.store.postgres.existingSecret }}
{{- .Values.store.postgres.existingSecret }}
{{- else }}
{{- include "cx-gateway.fullname" . }}
{{- end }}
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

{{- /* Where the database URL file and the database's CA bundle are mounted (read-only). */}}
{{- define "cx-gateway.postgresDir" -}}
/etc/cx-gateway/postgres
{{- end }}
{{- define "cx-gateway.postgresCaDir" -}}
/etc/cx-gateway/postgres-ca
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


{{/*
The pod template of the workload, one for both kinds (the StatefulSet of the embedded store and
the Deployment of the PostgreSQL mode), so the two never drift apart. Call with the root context.
*/}}
{{- define "cx-gateway.podTemplate" -}}
metadata:
  annotations:
    # Settings, keys, webhook secrets and the database URL are read once at start: roll the pod
    # when they change.
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
    {{- if include "cx-gateway.managedSecret" . }}
    checksum/secret: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
    {{- end }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  labels:
    {{- include "cx-gateway.labels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  serviceAccountName: {{ include "cx-gateway.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.serviceAccount.automount }}
  # Service links would inject <SERVICE>_PORT variables; a Service whose name starts with
  # "cxgw" would even add CXGW_* names the gateway reads as settings.
  enableServiceLinks: false
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ include "cx-gateway.terminationGracePeriodSeconds" . }}
  containers:
    - name: {{ .Chart.Name }}
      image: {{ include "cx-gateway.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args:
        - serve
        {{- if .Values.sandbox.enabled }}
        - --sandbox
        {{- end }}
      securityContext:
        {{- toYaml .Values.containerSecurityContext | nindent 8 }}
      ports:
        - name: grpc
          containerPort: {{ .Values.containerPorts.grpc }}
          protocol: TCP
        - name: http
          containerPort: {{ .Values.containerPorts.http }}
          protocol: TCP
        {{- if .Values.segment.enabled }}
        - name: segment
          containerPort: {{ .Values.containerPorts.segment }}
          protocol: TCP
        {{- end }}
      envFrom:
        - configMapRef:
            name: {{ include "cx-gateway.fullname" . }}
      env:
        # The only writable scratch space (SQLite spills temporary tables here).
        - name: TMPDIR
          value: /tmp
        {{- if include "cx-gateway.usesKeys" . }}
        # Keys are read from the mounted files, never from variable values.
        - name: CXGW_RETENTLY_API_KEY_FILE
          value: {{ include "cx-gateway.secretsDir" . }}/retently-api-key
        - name: CXGW_RETAINLY_API_KEY_FILE
          value: {{ include "cx-gateway.secretsDir" . }}/retainly-api-key
        - name: CXGW_RETAINLY_API_SECRET_FILE
          value: {{ include "cx-gateway.secretsDir" . }}/retainly-api-secret
        {{- end }}
        {{- if .Values.callers.existingSecret }}
        # Read again on change: a Secret update applies without a restart.
        - name: CXGW_CALLERS_FILE
          value: {{ include "cx-gateway.callersDir" . }}/callers.toml
        {{- end }}
        {{- if .Values.eventRules.existingConfigMap }}
        # Read again on change: a ConfigMap update applies without a restart.
        - name: CXGW_EVENT_RULES_FILE
          value: {{ include "cx-gateway.rulesDir" . }}/rules.toml
        {{- end }}
        {{- if .Values.alerts.existingSecret }}
        # Read again on change, with the secret files its rules name beside it.
        - name: CXGW_ALERT_RULES_FILE
          value: {{ include "cx-gateway.alertsDir" . }}/{{ .Values.alerts.rulesKey }}
        {{- end }}
        {{- if include "cx-gateway.postgres" . }}
        # The database URL carries its password: read from the mounted file, never a value.
        - name: CXGW_POSTGRES_URL_FILE
          value: {{ include "cx-gateway.postgresDir" . }}/url
        {{- if .Values.store.postgres.caSecretName }}
        - name: CXGW_POSTGRES_CA_FILE
          value: {{ include "cx-gateway.postgresCaDir" . }}/ca.crt
        {{- end }}
        {{- end }}
        {{- if .Values.tls.secretName }}
        - name: CXGW_TLS_CERT_FILE
          value: {{ include "cx-gateway.tlsDir" . }}/tls.crt
        - name: CXGW_TLS_KEY_FILE
          value: {{ include "cx-gateway.tlsDir" . }}/tls.key
        {{- end }}
        {{- if .Values.tls.clientCaSecretName }}
        - name: CXGW_TLS_CLIENT_CA_FILE
          value: {{ include "cx-gateway.clientCaDir" . }}/ca.crt
        {{- end }}
        {{- if .Values.webhook.enabled }}
        # The webhook receiver is on because its shared secret is set.
        - name: CXGW_WEBHOOK_SECRET_FILE
          value: {{ include "cx-gateway.webhookDir" . }}/webhook-secret
        {{- if .Values.webhook.requireSignature }}
        - name: CXGW_WEBHOOK_SIGNING_SECRET_FILE
          value: {{ include "cx-gateway.webhookDir" . }}/webhook-signing-secret
        {{- end }}
        {{- end }}
        {{- if .Values.otel.enabled }}
        - name: OTEL_K8S_NAMESPACE
          valueFrom:
            fieldRef:
              fieldPath: metadata.namespace
        - name: OTEL_K8S_POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: OTEL_K8S_NODE_NAME
          valueFrom:
            fieldRef:
              fieldPath: spec.nodeName
        - name: OTEL_EXPORTER_OTLP_ENDPOINT
          value: {{ .Values.otel.endpoint | quote }}
        - name: OTEL_EXPORTER_OTLP_PROTOCOL
          value: {{ .Values.otel.protocol | quote }}
        - name: OTEL_SERVICE_NAME
          value: {{ .Values.otel.serviceName | default (include "cx-gateway.fullname" .) | quote }}
        - name: OTEL_TRACES_SAMPLER
          value: {{ .Values.otel.sampler | quote }}
        - name: OTEL_TRACES_SAMPLER_ARG
          value: {{ .Values.otel.samplerArg | quote }}
        {{- $attributes := list "k8s.namespace.name=$(OTEL_K8S_NAMESPACE)" "k8s.pod.name=$(OTEL_K8S_POD_NAME)" "k8s.node.name=$(OTEL_K8S_NODE_NAME)" }}
        {{- range $name, $value := .Values.otel.resourceAttributes }}
        {{- $attributes = append $attributes (printf "%s=%s" $name (toString $value)) }}
        {{- end }}
        - name: OTEL_RESOURCE_ATTRIBUTES
          value: {{ join "," $attributes | quote }}
        {{- if .Values.otel.headersSecret.name }}
        - name: OTEL_EXPORTER_OTLP_HEADERS
          valueFrom:
            secretKeyRef:
              name: {{ .Values.otel.headersSecret.name }}
              key: {{ .Values.otel.headersSecret.key }}
        {{- end }}
        {{- range $name, $value := .Values.otel.extraEnv }}
        - name: {{ $name }}
          value: {{ toString $value | quote }}
        {{- end }}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if .Values.startupProbe.enabled }}
      startupProbe:
        {{- include "cx-gateway.probeHandler" (dict "ctx" $ "probe" .Values.startupProbe "path" "/livez") | nindent 8 }}
        initialDelaySeconds: {{ .Values.startupProbe.initialDelaySeconds }}
        periodSeconds: {{ .Values.startupProbe.periodSeconds }}
        timeoutSeconds: {{ .Values.startupProbe.timeoutSeconds }}
        failureThreshold: {{ .Values.startupProbe.failureThreshold }}
      {{- end }}
      {{- if .Values.livenessProbe.enabled }}
      livenessProbe:
        {{- include "cx-gateway.probeHandler" (dict "ctx" $ "probe" .Values.livenessProbe "path" "/livez") | nindent 8 }}
        initialDelaySeconds: {{ .Values.livenessProbe.initialDelaySeconds }}
        periodSeconds: {{ .Values.livenessProbe.periodSeconds }}
        timeoutSeconds: {{ .Values.livenessProbe.timeoutSeconds }}
        failureThreshold: {{ .Values.livenessProbe.failureThreshold }}
      {{- end }}
      {{- if .Values.readinessProbe.enabled }}
      readinessProbe:
        {{- include "cx-gateway.probeHandler" (dict "ctx" $ "probe" .Values.readinessProbe "path" "/readyz") | nindent 8 }}
        initialDelaySeconds: {{ .Values.readinessProbe.initialDelaySeconds }}
        periodSeconds: {{ .Values.readinessProbe.periodSeconds }}
        timeoutSeconds: {{ .Values.readinessProbe.timeoutSeconds }}
        failureThreshold: {{ .Values.readinessProbe.failureThreshold }}
        successThreshold: {{ .Values.readinessProbe.successThreshold }}
      {{- end }}
      {{- if .Values.lifecycle.preStopSleepSeconds }}
      lifecycle:
        preStop:
          sleep:
            seconds: {{ .Values.lifecycle.preStopSleepSeconds }}
      {{- end }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      volumeMounts:
        - name: data
          mountPath: {{ .Values.persistence.mountPath }}
        - name: tmp
          mountPath: /tmp
        {{- if include "cx-gateway.usesKeys" . }}
        - name: upstream-keys
          mountPath: {{ include "cx-gateway.secretsDir" . }}
          readOnly: true
        {{- end }}
        {{- if include "cx-gateway.postgres" . }}
        - name: postgres-url
          mountPath: {{ include "cx-gateway.postgresDir" . }}
          readOnly: true
        {{- if .Values.store.postgres.caSecretName }}
        - name: postgres-ca
          mountPath: {{ include "cx-gateway.postgresCaDir" . }}
          readOnly: true
        {{- end }}
        {{- end }}
        {{- if .Values.callers.existingSecret }}
        - name: callers
          mountPath: {{ include "cx-gateway.callersDir" . }}
          readOnly: true
        {{- end }}
        {{- if .Values.eventRules.existingConfigMap }}
        - name: event-rules
          mountPath: {{ include "cx-gateway.rulesDir" . }}
          readOnly: true
        {{- end }}
        {{- if .Values.alerts.existingSecret }}
        - name: alerts
          mountPath: {{ include "cx-gateway.alertsDir" . }}
          readOnly: true
        {{- end }}
        {{- if .Values.tls.secretName }}
        - name: tls
          mountPath: {{ include "cx-gateway.tlsDir" . }}
          readOnly: true
        {{- end }}
        {{- if .Values.tls.clientCaSecretName }}
        - name: client-ca
          mountPath: {{ include "cx-gateway.clientCaDir" . }}
          readOnly: true
        {{- end }}
        {{- if and .Values.segment.enabled .Values.segment.writeKeysSecret }}
        - name: segment-write-keys
          mountPath: {{ include "cx-gateway.segmentKeysDir" . }}
          readOnly: true
        {{- end }}
        {{- if .Values.webhook.enabled }}
        - name: webhook-secrets
          mountPath: {{ include "cx-gateway.webhookDir" . }}
          readOnly: true
        {{- end }}
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: {{ .Values.tmpSizeLimit }}
    {{- /* The embedded store's volume comes from the StatefulSet's claim template unless it is
         an existing claim; the PostgreSQL mode keeps nothing on the pod. */}}
    {{- if or (include "cx-gateway.postgres" .) (not .Values.persistence.enabled) }}
    - name: data
      emptyDir:
        sizeLimit: {{ .Values.persistence.emptyDirSizeLimit }}
    {{- else if .Values.persistence.existingClaim }}
    - name: data
      persistentVolumeClaim:
        claimName: {{ .Values.persistence.existingClaim }}
    {{- end }}
    {{- if include "cx-gateway.usesKeys" . }}
    - name: upstream-keys
      secret:
        secretName: {{ include "cx-gateway.secretName" . }}
        # Readable by the pod's group (fsGroup) only; fixed file names whatever the keys are
        # called in the Secret, so the *_FILE paths never change.
        defaultMode: 0440
        items:
          - key: {{ .Values.upstreamKeys.secretKeys.retentlyApiKey }}
            path: retently-api-key
          - key: {{ .Values.upstreamKeys.secretKeys.retainlyApiKey }}
            path: retainly-api-key
          - key: {{ .Values.upstreamKeys.secretKeys.retainlyApiSecret }}
            path: retainly-api-secret
    {{- end }}
    {{- if include "cx-gateway.postgres" . }}
    - name: postgres-url
      secret:
        secretName: {{ include "cx-gateway.postgresSecretName" . }}
        defaultMode: 0440
        items:
          - key: {{ .Values.store.postgres.secretKey }}
            path: url
    {{- if .Values.store.postgres.caSecretName }}
    - name: postgres-ca
      secret:
        secretName: {{ .Values.store.postgres.caSecretName }}
        defaultMode: 0440
        items:
          - key: {{ .Values.store.postgres.caSecretKey }}
            path: ca.crt
    {{- end }}
    {{- end }}
    {{- /* Whole-directory mounts (no subPath), so Secret updates reach the files. */}}
    {{- if .Values.callers.existingSecret }}
    - name: callers
      secret:
        secretName: {{ .Values.callers.existingSecret }}
        defaultMode: 0440
        items:
          - key: {{ .Values.callers.secretKey }}
            path: callers.toml
    {{- end }}
    {{- if .Values.eventRules.existingConfigMap }}
    - name: event-rules
      configMap:
        name: {{ .Values.eventRules.existingConfigMap }}
        defaultMode: 0440
        items:
          - key: {{ .Values.eventRules.configMapKey }}
            path: rules.toml
    {{- end }}
    {{- if .Values.alerts.existingSecret }}
    # Every key: the rules file and the secret files its rules name by path.
    - name: alerts
      secret:
        secretName: {{ .Values.alerts.existingSecret }}
        defaultMode: 0440
    {{- end }}
    {{- if .Values.tls.secretName }}
    - name: tls
      secret:
        secretName: {{ .Values.tls.secretName }}
        defaultMode: 0440
        items:
          - key: tls.crt
            path: tls.crt
          - key: tls.key
            path: tls.key
    {{- end }}
    {{- if .Values.tls.clientCaSecretName }}
    - name: client-ca
      secret:
        secretName: {{ .Values.tls.clientCaSecretName }}
        defaultMode: 0440
        items:
          - key: {{ .Values.tls.clientCaSecretKey }}
            path: ca.crt
    {{- end }}
    {{- if .Values.webhook.enabled }}
    - name: webhook-secrets
      secret:
        secretName: {{ include "cx-gateway.webhookSecretName" . }}
        defaultMode: 0440
        items:
          - key: {{ .Values.webhook.secretKeys.secret }}
            path: webhook-secret
          {{- if .Values.webhook.requireSignature }}
          - key: {{ .Values.webhook.secretKeys.signingSecret }}
            path: webhook-signing-secret
          {{- end }}
    {{- end }}
    {{- if and .Values.segment.enabled .Values.segment.writeKeysSecret }}
    # Every key of the Secret is a file; read again on change, so rotations need no restart.
    - name: segment-write-keys
      secret:
        secretName: {{ .Values.segment.writeKeysSecret }}
        defaultMode: 0440
    {{- end }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
