{{/* The chart name, or nameOverride. */}}
{{- define "mailhook.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every resource name: the release name, with the chart name unless it holds it. */}}
{{- define "mailhook.fullname" -}}
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

{{- define "mailhook.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "mailhook.labels" -}}
helm.sh/chart: {{ include "mailhook.chart" . }}
{{ include "mailhook.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mailhook
{{- end }}

{{/* Labels that select the operator's pod; never change them between versions. */}}
{{- define "mailhook.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mailhook.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mailhook.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mailhook.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mailhook.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret holding the ingest token: the user's, or the one the operator creates. */}}
{{- define "mailhook.ingestTokenSecret" -}}
{{- default (printf "%s-ingest-token" (include "mailhook.fullname" .)) .Values.ingest.token.existingSecret }}
{{- end }}
