{{/*
The admin's policy (values `policy:`) as CEL literals for the ValidatingAdmissionPolicy in
policy.yaml. The same values reach the operator as JSON (the ConfigMap in policy.yaml), and
llmpipe_operator/policy.py applies the same rules, so the two checks agree.
*/}}

{{/* Image patterns as anchored RE2 regexes: `*` is [^/]*, everything else literal
(llmpipe_operator.policy.image_pattern_regex builds the same). A CEL list literal. */}}
{{- define "llmpipe.policy.imageRegexes" -}}
{{- $out := list }}
{{- range .Values.policy.allowedImages }}
{{- $parts := list }}
{{- range (splitList "*" .) }}{{ $parts = append $parts (regexQuoteMeta .) }}{{ end }}
{{- $out = append $out (printf "^%s$" (join "[^/]*" $parts)) }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* The profiles' images (always allowed). A CEL list literal. */}}
{{- define "llmpipe.policy.profileImages" -}}
{{- $out := list }}
{{- range $name, $profile := .Values.policy.runtimeProfiles }}
{{- $out = append $out $profile.image }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* Profile name -> the devices it allows. A CEL map literal. */}}
{{- define "llmpipe.policy.profileDevices" -}}
{{- $out := dict }}
{{- range $name, $profile := .Values.policy.runtimeProfiles }}
{{- $_ := set $out $name ($profile.allowedDevices | default list) }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* Host path prefixes without a trailing slash ("/" becomes "": every path is under it). */}}
{{- define "llmpipe.policy.hostPrefixes" -}}
{{- $out := list }}
{{- range .Values.policy.allowedHostPaths }}
{{- $out = append $out (trimSuffix "/" .) }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* The policy as the operator reads it (--policy FILE). */}}
{{- define "llmpipe.policy.json" -}}
{{- toJson (omit .Values.policy "admission") }}
{{- end }}

{{/* Fails the render when the default profile is not a profile. */}}
{{- define "llmpipe.policy.validate" -}}
{{- if not (hasKey .Values.policy.runtimeProfiles .Values.policy.defaultProfile) }}
{{- fail (printf "policy.defaultProfile %q is not one of policy.runtimeProfiles (%s)" .Values.policy.defaultProfile (keys .Values.policy.runtimeProfiles | sortAlpha | join ", ")) }}
{{- end }}
{{- end }}
