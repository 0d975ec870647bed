{{- define "freshet.fullname" -}}
{{- if contains "operator" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "freshet.labels" -}}
app.kubernetes.io/name: freshet-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "freshet.selector" -}}
app.kubernetes.io/name: freshet-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "freshet.serviceAccount" -}}
{{- default (include "freshet.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "freshet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
