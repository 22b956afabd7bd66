{{/* Name of the chart, overridable. */}}
{{- define "riskstream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: <release>-riskstream unless the release name already says riskstream. */}}
{{- define "riskstream.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels that select the pods (never change them on upgrade). */}}
{{- define "riskstream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "riskstream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every resource. */}}
{{- define "riskstream.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "riskstream.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: scorer
{{- end -}}

{{- define "riskstream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "riskstream.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the admin token (key admin-token). */}}
{{- define "riskstream.adminSecret" -}}
{{- default (include "riskstream.fullname" .) .Values.admin.existingSecret -}}
{{- end -}}

{{/* The Secret holding Kafka client properties (key client.properties), if any. */}}
{{- define "riskstream.kafkaSecret" -}}
{{- if .Values.kafka.existingSecret -}}
{{- .Values.kafka.existingSecret -}}
{{- else if or .Values.kafka.credentials .Values.kafka.properties -}}
{{- printf "%s-kafka" (include "riskstream.fullname" .) -}}
{{- end -}}
{{- end -}}
