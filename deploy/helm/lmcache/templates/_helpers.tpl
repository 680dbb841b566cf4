{{/* Names and labels. */}}
{{- define "lmcache.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lmcache.fullname" -}}
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

{{- define "lmcache.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lmcache.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: cache-server
{{- end -}}

{{- define "lmcache.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "lmcache.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "lmcache.secretName" -}}
{{- default (printf "%s-auth" (include "lmcache.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "lmcache.socketPath" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.socket.dir) .Values.socket.name -}}
{{- end -}}

{{/* Where the ConfigMap's cache.yaml and the secret are mounted in the server. */}}
{{- define "lmcache.configPath" -}}/etc/lmcache/config/cache.yaml{{- end -}}
{{- define "lmcache.secretPath" -}}/etc/lmcache/auth/{{ .Values.auth.key }}{{- end -}}

{{/*
lmcache.sizeBytes: (list VALUE WHAT) -> bytes, as lmcache_core.sizes.parse_size reads a
size: a bare number (or a string without a unit) is GB as upstream LMCache counts them
(2**30 bytes); B, KB, MB, GB, TB are powers of 1000; KiB, MiB, GiB, TiB powers of 1024.
tests/test_deploy.py compares it with parse_size.
*/}}
{{- define "lmcache.sizeBytes" -}}
{{- $v := index . 0 -}}
{{- $what := index . 1 -}}
{{- $units := dict "" 1073741824 "b" 1 "k" 1000 "kb" 1000 "m" 1000000 "mb" 1000000 "g" 1000000000 "gb" 1000000000 "t" 1000000000000 "tb" 1000000000000 "kib" 1024 "mib" 1048576 "gib" 1073741824 "tib" 1099511627776 -}}
{{- if kindIs "bool" $v -}}
{{- fail (printf "%s must be a size such as 5GiB or 512MB, not a boolean" $what) -}}
{{- else if or (kindIs "float64" $v) (kindIs "int" $v) (kindIs "int64" $v) -}}
{{- if lt (float64 $v) 0.0 -}}{{- fail (printf "%s=%v is negative; sizes must be >= 0" $what $v) -}}{{- end -}}
{{- mulf $v 1073741824 | int64 -}}
{{- else if kindIs "string" $v -}}
{{- $re := `^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$` -}}
{{- if not (regexMatch $re $v) -}}
{{- fail (printf "%s=%q is not a size; write e.g. 5GiB, 512MB, 4096B or 1.5 (GB)" $what $v) -}}
{{- end -}}
{{- $num := regexReplaceAll $re $v "${1}" -}}
{{- $unit := regexReplaceAll $re $v "${2}" | lower -}}
{{- if not (hasKey $units $unit) -}}
{{- fail (printf "%s=%q has an unknown unit %q; use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB" $what $v (regexReplaceAll $re $v "${2}")) -}}
{{- end -}}
{{- mulf (float64 $num) (index $units $unit) | int64 -}}
{{- else -}}
{{- fail (printf "%s must be a size such as 5GiB or 512MB" $what) -}}
{{- end -}}
{{- end -}}

{{/*
lmcache.quantityBytes: (list VALUE WHAT) -> bytes of a Kubernetes memory quantity
(16Gi, 17179869184, 16G, 1.5Gi, 500M).
*/}}
{{- define "lmcache.quantityBytes" -}}
{{- $v := index . 0 -}}
{{- $what := index . 1 -}}
{{- $suffixes := dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "P" 1000000000000000 "E" 1000000000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "Pi" 1125899906842624 "Ei" 1152921504606846976 -}}
{{- if or (kindIs "float64" $v) (kindIs "int" $v) (kindIs "int64" $v) -}}
{{- $v | int64 -}}
{{- else -}}
{{- $s := toString $v -}}
{{- $re := `^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([eE][0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$` -}}
{{- if not (regexMatch $re $s) -}}
{{- fail (printf "%s=%q is not a Kubernetes memory quantity (e.g. 24Gi, 25769803776)" $what $s) -}}
{{- end -}}
{{- $num := regexReplaceAll $re $s "${1}${2}" -}}
{{- $suffix := regexReplaceAll $re $s "${3}" -}}
{{- mulf (float64 $num) (index $suffixes $suffix) | int64 -}}
{{- end -}}
{{- end -}}

{{/* The DRAM arena in bytes: cacheConfig.max_local_cpu_size, or CacheConfig's default (5 GB). */}}
{{- define "lmcache.arenaBytes" -}}
{{- include "lmcache.sizeBytes" (list (include "lmcache.arenaValue" . | fromJson).v "cacheConfig.max_local_cpu_size") -}}
{{- end -}}

{{/* max_local_cpu_size as written, as {"v": value} (5, CacheConfig's default, when absent). */}}
{{- define "lmcache.arenaValue" -}}
{{- $cfg := .Values.cacheConfig | default dict -}}
{{- dict "v" (ternary (get $cfg "max_local_cpu_size") 5 (hasKey $cfg "max_local_cpu_size")) | toJson -}}
{{- end -}}

{{/* What the server needs in memory, bytes: the arena (resident at start) plus headroom. */}}
{{- define "lmcache.memoryNeededBytes" -}}
{{- $arena := include "lmcache.arenaBytes" . | float64 -}}
{{- $headroom := include "lmcache.quantityBytes" (list .Values.resources.memoryHeadroom "resources.memoryHeadroom") | float64 -}}
{{- addf $arena $headroom | int64 -}}
{{- end -}}

{{/* The same, rounded up to whole MiB, as a quantity. */}}
{{- define "lmcache.memoryNeeded" -}}
{{- $bytes := include "lmcache.memoryNeededBytes" . | float64 -}}
{{- printf "%dMi" (ceil (divf $bytes 1048576) | int64) -}}
{{- end -}}

{{/*
lmcache.memory: "request" or "limit" as rendered. A user's value below what the
arena needs fails here, at render time, not later as an OOMKill (production-stack#923).
*/}}
{{- define "lmcache.memory" -}}
{{- $root := index . 0 -}}
{{- $which := index . 1 -}}
{{- $needed := include "lmcache.memoryNeeded" $root -}}
{{- $neededBytes := include "lmcache.memoryNeededBytes" $root | float64 -}}
{{- $requests := $root.Values.resources.requests | default dict -}}
{{- $limits := $root.Values.resources.limits | default dict -}}
{{- $given := ternary (get $requests "memory") (get $limits "memory") (eq $which "request") -}}
{{- if and (eq $which "limit") (not $given) -}}
{{- $given = get $requests "memory" -}}
{{- end -}}
{{- if $given -}}
{{- $key := ternary "resources.requests.memory" "resources.limits.memory" (eq $which "request") -}}
{{- $givenBytes := include "lmcache.quantityBytes" (list $given $key) | float64 -}}
{{- if lt $givenBytes $neededBytes -}}
{{- fail (printf "%s=%v is below what the lmcache server needs, %s: its DRAM arena (cacheConfig.max_local_cpu_size=%v) is made resident at start and counts against the pod's memory, plus resources.memoryHeadroom=%v. Set %s to at least %s (or leave it unset: the chart derives it), or lower max_local_cpu_size; with less, the server is OOMKilled." $key $given $needed (include "lmcache.arenaValue" $root | fromJson).v $root.Values.resources.memoryHeadroom $key $needed) -}}
{{- end -}}
{{- $given -}}
{{- else -}}
{{- $needed -}}
{{- end -}}
{{- end -}}

{{/* Startup probe failures allowed: 60 s plus 2 s per GiB of arena (measured ~0.5 s per GiB). */}}
{{- define "lmcache.startupFailureThreshold" -}}
{{- if .Values.probes.startup.failureThreshold -}}
{{- .Values.probes.startup.failureThreshold -}}
{{- else -}}
{{- $gib := divf (include "lmcache.arenaBytes" . | float64) 1073741824 -}}
{{- ceil (divf (addf 60 (mulf 2 $gib)) .Values.probes.startup.periodSeconds) | int64 -}}
{{- end -}}
{{- end -}}

{{/* The cache config as rendered: the user's, with server_url this node's socket. */}}
{{- define "lmcache.cacheConfig" -}}
{{- $cfg := deepCopy (.Values.cacheConfig | default dict) -}}
{{- range $k := list "auth_secret" "secret" "lmcache_auth_secret" -}}
{{- if hasKey $cfg $k -}}
{{- fail (printf "cacheConfig.%s: the deployment secret never goes in the cache config; the chart mounts it from a Secret (auth.existingSecret, or one it generates)" $k) -}}
{{- end -}}
{{- end -}}
{{- if hasKey $cfg "auth_secret_file" -}}
{{- fail "cacheConfig.auth_secret_file: the chart sets it for the server (from auth); remove it here, engines on the socket need no secret" -}}
{{- end -}}
{{- $url := printf "unix://%s" (include "lmcache.socketPath" .) -}}
{{- if and (hasKey $cfg "server_url") (ne (toString (get $cfg "server_url")) $url) -}}
{{- fail (printf "cacheConfig.server_url=%v: this chart's server listens on %s (socket.dir, socket.name); remove server_url, the chart sets it" (get $cfg "server_url") $url) -}}
{{- end -}}
{{- $_ := set $cfg "server_url" $url -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* The disk tier's folder in the pod, when cacheConfig.local_disk is set. */}}
{{- define "lmcache.diskPath" -}}
{{- $cfg := .Values.cacheConfig | default dict -}}
{{- with get $cfg "local_disk" -}}
{{- $p := trimPrefix "file://" (toString .) -}}
{{- if not (hasPrefix "/" $p) -}}
{{- fail (printf "cacheConfig.local_disk=%v: give an absolute path (file:///var/lib/lmcache/disk) so the chart can mount a volume there" .) -}}
{{- end -}}
{{- trimSuffix "/" $p -}}
{{- end -}}
{{- end -}}

{{/* The admin endpoint's address: the pod's own addresses with the secret, loopback without. */}}
{{- define "lmcache.adminHost" -}}
{{- if .Values.auth.enabled -}}0.0.0.0{{- else -}}127.0.0.1{{- end -}}
{{- end -}}
