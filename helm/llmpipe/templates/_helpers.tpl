{{/*
Named templates shared by every manifest of the chart (rbac.yaml included).
*/}}

{{/* The chart name, truncated to the 63 characters a label value allows. */}}
{{- define "llmpipe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full resource name: <release>-llmpipe, or just <release> when the release name already
contains the chart name (so `helm install llmpipe ...` gives "llmpipe", not "llmpipe-llmpipe").
*/}}
{{- define "llmpipe.fullname" -}}
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

{{- define "llmpipe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object the chart creates. */}}
{{- define "llmpipe.labels" -}}
helm.sh/chart: {{ include "llmpipe.chart" . }}
{{ include "llmpipe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llmpipe
{{- end }}

{{/* Labels that select the operator pod (immutable once installed: keep them stable). */}}
{{- define "llmpipe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmpipe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The operator's ServiceAccount name (the subject of every RBAC binding). */}}
{{- define "llmpipe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llmpipe.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image reference; the tag defaults to the chart's appVersion. */}}
{{- define "llmpipe.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The runner's namespace flags: `--all-namespaces` (opt-in), or `--namespace NS` each. */}}
{{- define "llmpipe.namespaceArgs" -}}
{{- if .Values.watch.allNamespaces }}
- --all-namespaces
{{- else }}
{{- range .Values.watch.namespaces }}
- --namespace
- {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}
