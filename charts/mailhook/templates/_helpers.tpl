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

{{/*
Whether a LabelSelector (dict "selector" SEL "labels" LABELS) matches a set of labels, as
the apiserver decides it: every matchLabels pair and every matchExpressions requirement
must hold; an empty selector matches everything. Prints "true" or nothing.
*/}}
{{- define "mailhook.selectorMatches" -}}
{{- $labels := .labels | default dict }}
{{- $ok := true }}
{{- range $k, $v := .selector.matchLabels | default dict }}
{{- if or (not (hasKey $labels $k)) (ne (toString (get $labels $k)) (toString $v)) }}
{{- $ok = false }}
{{- end }}
{{- end }}
{{- range $e := .selector.matchExpressions | default list }}
{{- $has := hasKey $labels $e.key }}
{{- $in := and $has (has (toString (get $labels $e.key)) ($e.values | default list)) }}
{{- if eq $e.operator "In" }}{{ if not $in }}{{ $ok = false }}{{ end }}
{{- else if eq $e.operator "NotIn" }}{{ if $in }}{{ $ok = false }}{{ end }}
{{- else if eq $e.operator "Exists" }}{{ if not $has }}{{ $ok = false }}{{ end }}
{{- else if eq $e.operator "DoesNotExist" }}{{ if $has }}{{ $ok = false }}{{ end }}
{{- else }}{{ $ok = false }}
{{- end }}
{{- end }}
{{- if $ok }}true{{ end }}
{{- end }}
