{{/*
Helpers shared by every template. Components are passed as a dict:
  (dict "root" $ "component" "planner")
*/}}

{{/* The five services of the control plane, in loop order. */}}
{{- define "mlsysops.components" -}}
{{- list "monitor" "analyzer" "planner" "scheduler" "executor" | toJson -}}
{{- end }}

{{/* Which plugin directory a service loads: the monitor reads policy contexts only,
analyzer and planner run policies, scheduler (conflict_key) and executor run mechanisms. */}}
{{- define "mlsysops.pluginKind" -}}
{{- $kinds := dict "monitor" "policies" "analyzer" "policies" "planner" "policies" "scheduler" "mechanisms" "executor" "mechanisms" -}}
{{- index $kinds . -}}
{{- end }}

{{/* Chart name, overridable with nameOverride. */}}
{{- define "mlsysops.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{/* Fully qualified app name: release-chart, shortened to leave room for suffixes. */}}
{{- define "mlsysops.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* Name of one component's objects: <fullname>-<component>. */}}
{{- define "mlsysops.componentFullname" -}}
{{- printf "%s-%s" (include "mlsysops.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "mlsysops.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{/* Labels of every object; pass the root context, or (dict "root" $ "component" c). */}}
{{- define "mlsysops.labels" -}}
{{- $root := .root | default . -}}
helm.sh/chart: {{ include "mlsysops.chart" $root }}
{{ include "mlsysops.selectorLabels" . }}
{{- with $root.Chart.AppVersion }}
app.kubernetes.io/version: {{ . | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: mlsysops
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels; with a component, they select that component only. */}}
{{- define "mlsysops.selectorLabels" -}}
{{- $root := .root | default . -}}
app.kubernetes.io/name: {{ include "mlsysops.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{/* The mlsysops image reference: registry/repository:tag or @digest. */}}
{{- define "mlsysops.image" -}}
{{- $img := .Values.image -}}
{{- $repo := $img.repository -}}
{{- if $img.registry -}}
{{- $repo = printf "%s/%s" $img.registry $img.repository -}}
{{- end -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $repo $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end }}

{{/* The bundled NATS image reference. */}}
{{- define "mlsysops.natsImage" -}}
{{- $img := .Values.nats.bundled.image -}}
{{- $repo := $img.repository -}}
{{- if $img.registry -}}
{{- $repo = printf "%s/%s" $img.registry $img.repository -}}
{{- end -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $repo $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo $img.tag -}}
{{- end -}}
{{- end }}

{{/* Service account of the monitor, analyzer, planner, scheduler and test pod:
no Kubernetes permissions and no token. */}}
{{- define "mlsysops.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mlsysops.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end }}

{{/* Service account of the executor, the only one bound to a Role (and to the
ClusterRole that reads Nodes). */}}
{{- define "mlsysops.executorServiceAccountName" -}}
{{- $sa := .Values.executor.serviceAccount -}}
{{- if $sa.create -}}
{{- default (printf "%s-executor" (include "mlsysops.fullname" .)) $sa.name -}}
{{- else -}}
{{- default "default" $sa.name -}}
{{- end -}}
{{- end }}

{{/* Namespace where the Fluidity mechanism manages Deployments and Services. */}}
{{- define "mlsysops.fluidityNamespace" -}}
{{- default .Release.Namespace .Values.executor.fluidity.namespace -}}
{{- end }}

{{/* Name of the executor's Role/ClusterRole and binding. When they live outside the
release namespace (a ClusterRole, or a Role in another Fluidity namespace) the name also
carries the release namespace, so that releases of the same name do not collide. */}}
{{- define "mlsysops.executorRoleName" -}}
{{- if or .Values.executor.rbac.clusterWide (ne (include "mlsysops.fluidityNamespace" .) .Release.Namespace) -}}
{{- printf "%s-%s-executor" .Release.Namespace (include "mlsysops.fullname" .) -}}
{{- else -}}
{{- printf "%s-executor" (include "mlsysops.fullname" .) -}}
{{- end -}}
{{- end }}

{{/* Name of the executor's ClusterRole and ClusterRoleBinding for reading Nodes
(cluster-scoped, so a Role cannot grant them). Always carries the release namespace, so
that releases of the same name in different namespaces do not collide. */}}
{{- define "mlsysops.executorNodesRoleName" -}}
{{- printf "%s-%s-executor-nodes" .Release.Namespace (include "mlsysops.fullname" .) -}}
{{- end }}

{{/* Whether the bundled NATS runs as a cluster. */}}
{{- define "mlsysops.natsClustered" -}}
{{- if and .Values.nats.bundled.enabled .Values.nats.cluster.enabled }}true{{ end -}}
{{- end }}

{{/* Number of servers of the bundled NATS. */}}
{{- define "mlsysops.natsReplicas" -}}
{{- if include "mlsysops.natsClustered" . }}{{ int .Values.nats.cluster.replicas }}{{ else }}1{{ end -}}
{{- end }}

{{/* Stable DNS name of bundled NATS server number .index (its pod in the headless
Service). */}}
{{- define "mlsysops.natsMemberHost" -}}
{{- $full := include "mlsysops.fullname" .root -}}
{{- printf "%s-nats-%d.%s-nats-headless.%s.svc" $full (int .index) $full .root.Release.Namespace -}}
{{- end }}

{{/* NATS URL(s) the services connect to. With the clustered bundled NATS: every member
by its stable name, so that a client reconnects to another member when one goes. */}}
{{- define "mlsysops.natsUrl" -}}
{{- if include "mlsysops.natsClustered" . -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.nats.cluster.replicas) -}}
{{- $urls = append $urls (printf "nats://%s:4222" (include "mlsysops.natsMemberHost" (dict "root" $ "index" $i))) -}}
{{- end -}}
{{- join "," $urls -}}
{{- else if .Values.nats.bundled.enabled -}}
{{- printf "nats://%s-nats.%s.svc:4222" (include "mlsysops.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- .Values.nats.url -}}
{{- end -}}
{{- end }}

{{/* Bytes of a NATS size ("1GB", "256MB", "512K", a plain number). */}}
{{- define "mlsysops.natsBytes" -}}
{{- $s := upper (toString .) -}}
{{- $digits := regexFind "^[0-9]+" $s -}}
{{- $units := dict "" 1 "K" 1024 "KB" 1024 "M" 1048576 "MB" 1048576 "G" 1073741824 "GB" 1073741824 "T" 1099511627776 "TB" 1099511627776 -}}
{{- mul (int64 $digits) (index $units (trimPrefix $digits $s)) -}}
{{- end }}

{{/* The bundled server's JetStream store (file, or memory with config.storage=memory)
shared by the layout: JetStream reserves each stream's and bucket's byte limit in the
store, so each gets 1/12 of it (6 streams and 6 buckets; two of the buckets are bounded
by age only and take their share as headroom). */}}
{{- define "mlsysops.layoutShare" -}}
{{- $js := .Values.nats.bundled.jetstream -}}
{{- $store := ternary $js.maxMemoryStore $js.maxFileStore (eq .Values.config.storage "memory") -}}
{{- div (int64 (include "mlsysops.natsBytes" $store)) 12 -}}
{{- end }}

{{/* Byte limit of each loop stream (.key streamMaxBytes) or bucket (kvMaxBytes): the
value; else, with the bundled NATS, its share of the store; else empty (the services'
default). */}}
{{- define "mlsysops.layoutBytes" -}}
{{- $value := index .root.Values.config .key -}}
{{- if not (kindIs "invalid" $value) -}}
{{- int64 $value -}}
{{- else if .root.Values.nats.bundled.enabled -}}
{{- include "mlsysops.layoutShare" .root -}}
{{- end -}}
{{- end }}

{{/* Replicas of every stream and bucket: nats.streamReplicas, else 3 on the clustered
bundled NATS, else 1. */}}
{{- define "mlsysops.streamReplicas" -}}
{{- if kindIs "invalid" .Values.nats.streamReplicas -}}
{{- if include "mlsysops.natsClustered" . }}3{{ else }}1{{ end -}}
{{- else -}}
{{- int .Values.nats.streamReplicas -}}
{{- end -}}
{{- end }}

{{/* Where secrets and plugins are mounted in the mlsysops containers. */}}
{{- define "mlsysops.natsAuthDir" -}}/etc/mlsysops/nats-auth{{- end }}
{{- define "mlsysops.natsTlsDir" -}}/etc/mlsysops/nats-tls{{- end }}
{{- define "mlsysops.natsLeafTlsDir" -}}/etc/nats-leafnodes-tls{{- end }}
{{- define "mlsysops.pluginDir" -}}
{{- printf "%s/%s" (trimSuffix "/" .root.Values.plugins.mountPath) .kind -}}
{{- end }}

{{/* Settings that every mlsysops process (services and the test pod) reads from the
environment (MLSYSOPS_<NAME>). Secrets only ever come from secretKeyRef or files. */}}
{{- define "mlsysops.env" -}}
{{- $v := .Values -}}
- name: MLSYSOPS_NATS_URL
  value: {{ include "mlsysops.natsUrl" . | quote }}
- name: MLSYSOPS_PREFIX
  value: {{ $v.config.prefix | quote }}
- name: MLSYSOPS_HTTP_PORT
  value: {{ $v.config.httpPort | quote }}
- name: MLSYSOPS_LOG_FORMAT
  value: {{ $v.config.logFormat | quote }}
- name: MLSYSOPS_LOG_LEVEL
  value: {{ $v.config.logLevel | quote }}
- name: MLSYSOPS_STORAGE
  value: {{ $v.config.storage | quote }}
- name: MLSYSOPS_STREAM_REPLICAS
  value: {{ include "mlsysops.streamReplicas" . | quote }}
{{- with include "mlsysops.layoutBytes" (dict "root" . "key" "streamMaxBytes") }}
- name: MLSYSOPS_STREAM_MAX_BYTES
  value: {{ . | quote }}
{{- end }}
{{- with include "mlsysops.layoutBytes" (dict "root" . "key" "kvMaxBytes") }}
- name: MLSYSOPS_KV_MAX_BYTES
  value: {{ . | quote }}
{{- end }}
- name: MLSYSOPS_INSTANCE
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- with $v.config.prometheusUrl }}
- name: MLSYSOPS_PROMETHEUS_URL
  value: {{ . | quote }}
{{- end }}
{{- with $v.config.mlConnectorUrl }}
- name: MLSYSOPS_ML_CONNECTOR_URL
  value: {{ . | quote }}
{{- end }}
{{- $auth := $v.nats.auth }}
{{- if eq $auth.type "userPassword" }}
- name: MLSYSOPS_NATS_USER
  valueFrom:
    secretKeyRef:
      name: {{ $auth.existingSecret | quote }}
      key: {{ $auth.userKey | quote }}
- name: MLSYSOPS_NATS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $auth.existingSecret | quote }}
      key: {{ $auth.passwordKey | quote }}
{{- else if eq $auth.type "token" }}
- name: MLSYSOPS_NATS_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $auth.existingSecret | quote }}
      key: {{ $auth.tokenKey | quote }}
{{- else if eq $auth.type "creds" }}
- name: MLSYSOPS_NATS_CREDS
  value: {{ printf "%s/%s" (include "mlsysops.natsAuthDir" .) $auth.credsKey | quote }}
{{- else if eq $auth.type "nkey" }}
- name: MLSYSOPS_NATS_NKEY_SEED
  value: {{ printf "%s/%s" (include "mlsysops.natsAuthDir" .) $auth.nkeySeedKey | quote }}
{{- end }}
{{- $tls := $v.nats.tls }}
{{- if $tls.enabled }}
{{- if $tls.caKey }}
- name: MLSYSOPS_NATS_TLS_CA
  value: {{ printf "%s/%s" (include "mlsysops.natsTlsDir" .) $tls.caKey | quote }}
{{- end }}
{{- if $tls.clientCert }}
- name: MLSYSOPS_NATS_TLS_CERT
  value: {{ printf "%s/%s" (include "mlsysops.natsTlsDir" .) $tls.certKey | quote }}
- name: MLSYSOPS_NATS_TLS_KEY
  value: {{ printf "%s/%s" (include "mlsysops.natsTlsDir" .) $tls.keyKey | quote }}
{{- end }}
{{- end }}
{{- range $name, $value := $v.config.extra }}
{{- /* YAML numbers arrive as floats: a whole number is written as one (10000000, not 1e+07). */}}
{{- if and (kindIs "float64" $value) (eq (float64 (int64 $value)) $value) }}
{{- $value = int64 $value }}
{{- end }}
- name: {{ printf "MLSYSOPS_%s" (upper $name) }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* Volume mounts every mlsysops container needs: a writable /tmp and the NATS
credential/TLS files when configured. */}}
{{- define "mlsysops.commonVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if has .Values.nats.auth.type (list "creds" "nkey") }}
- name: nats-auth
  mountPath: {{ include "mlsysops.natsAuthDir" . }}
  readOnly: true
{{- end }}
{{- if .Values.nats.tls.enabled }}
- name: nats-tls
  mountPath: {{ include "mlsysops.natsTlsDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The volumes behind mlsysops.commonVolumeMounts. */}}
{{- define "mlsysops.commonVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- $auth := .Values.nats.auth }}
{{- if has $auth.type (list "creds" "nkey") }}
{{- $key := ternary $auth.credsKey $auth.nkeySeedKey (eq $auth.type "creds") }}
- name: nats-auth
  secret:
    secretName: {{ $auth.existingSecret | quote }}
    defaultMode: 0440
    items:
      - key: {{ $key | quote }}
        path: {{ $key | quote }}
{{- end }}
{{- $tls := .Values.nats.tls }}
{{- if $tls.enabled }}
- name: nats-tls
  secret:
    secretName: {{ $tls.existingSecret | quote }}
    defaultMode: 0440
    items:
      {{- if $tls.caKey }}
      - key: {{ $tls.caKey | quote }}
        path: {{ $tls.caKey | quote }}
      {{- end }}
      {{- if $tls.clientCert }}
      - key: {{ $tls.certKey | quote }}
        path: {{ $tls.certKey | quote }}
      - key: {{ $tls.keyKey | quote }}
        path: {{ $tls.keyKey | quote }}
      {{- end }}
{{- end }}
{{- end }}

{{/* Pod anti-affinity from a preset (soft or hard) for one component. */}}
{{- define "mlsysops.antiAffinity" -}}
{{- $selector := include "mlsysops.selectorLabels" . -}}
podAntiAffinity:
{{- if eq .preset "hard" }}
  requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels:
          {{- $selector | nindent 10 }}
{{- else }}
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- $selector | nindent 12 }}
{{- end }}
{{- end }}

{{/* Cross-field checks that a JSON schema cannot explain clearly. Included once, by
templates/deployment.yaml, so that an invalid combination fails install and template. */}}
{{- define "mlsysops.validateValues" -}}
{{- $nats := .Values.nats -}}
{{- if and (not $nats.bundled.enabled) (not $nats.url) -}}
{{- fail "nats.url: set the URL of your NATS server (with JetStream), or set nats.bundled.enabled=true for an evaluation NATS" -}}
{{- end -}}
{{- if and (ne $nats.auth.type "none") (not $nats.auth.existingSecret) -}}
{{- fail (printf "nats.auth.existingSecret: name the Secret that holds the NATS credential (nats.auth.type is %s)" $nats.auth.type) -}}
{{- end -}}
{{- if and $nats.tls.enabled (not $nats.tls.existingSecret) -}}
{{- fail "nats.tls.existingSecret: name the Secret that holds the CA (and client certificate) when nats.tls.enabled is true" -}}
{{- end -}}
{{- if and $nats.tls.enabled (not $nats.tls.caKey) (not $nats.tls.clientCert) -}}
{{- fail "nats.tls: set nats.tls.caKey and/or nats.tls.clientCert=true; with neither there is nothing to mount (use a tls:// URL for system-trusted servers)" -}}
{{- end -}}
{{- if $nats.bundled.enabled -}}
{{- if has $nats.auth.type (list "creds" "nkey") -}}
{{- fail (printf "nats.auth.type=%s needs an operator-configured NATS: the bundled NATS supports none, userPassword or token" $nats.auth.type) -}}
{{- end -}}
{{- if $nats.tls.enabled -}}
{{- fail "nats.tls.enabled: the bundled NATS serves plain connections only; use an external NATS (nats.bundled.enabled=false) for TLS" -}}
{{- end -}}
{{- if and $nats.cluster.enabled (eq (mod (int $nats.cluster.replicas) 2) 0) -}}
{{- fail (printf "nats.cluster.replicas: use an odd number of servers, at least 3 (got %d): JetStream needs a majority, and an even number tolerates no more losses than one less" (int $nats.cluster.replicas)) -}}
{{- end -}}
{{- $servers := int (include "mlsysops.natsReplicas" .) -}}
{{- if gt (int (include "mlsysops.streamReplicas" .)) $servers -}}
{{- fail (printf "nats.streamReplicas: %s replicas need as many NATS servers, the bundled NATS has %d (nats.cluster)" (include "mlsysops.streamReplicas" .) $servers) -}}
{{- end -}}
{{- $leaf := $nats.leafnodes -}}
{{- if $leaf.enabled -}}
{{- if and (not $leaf.tls.existingSecret) (not $leaf.insecure) -}}
{{- fail "nats.leafnodes.tls.existingSecret: name the Secret with the leaf node port's server certificate and key (or set nats.leafnodes.insecure=true to accept leaf nodes without TLS, on a trusted network only)" -}}
{{- end -}}
{{- if and (not $leaf.auth.existingSecret) (not $leaf.insecure) -}}
{{- fail "nats.leafnodes.auth.existingSecret: name the Secret with the credentials (user, password) leaf nodes present (or set nats.leafnodes.insecure=true to accept leaf nodes without credentials, on a trusted network only)" -}}
{{- end -}}
{{- if and $leaf.tls.caKey (not $leaf.tls.existingSecret) -}}
{{- fail "nats.leafnodes.tls.caKey: the CA is read from nats.leafnodes.tls.existingSecret; name that Secret" -}}
{{- end -}}
{{- end -}}
{{- else if $nats.leafnodes.enabled -}}
{{- fail "nats.leafnodes.enabled: the leaf node port is opened on the bundled NATS (nats.bundled.enabled=true); with an external NATS configure its leafnodes block there (the official chart: config.leafnodes)" -}}
{{- end -}}
{{- $reserved := list "nats_url" "prefix" "http_port" "log_format" "log_level" "storage" "stream_replicas" "stream_max_bytes" "kv_max_bytes" "instance" "prometheus_url" "ml_connector_url" "policy_dir" "mechanism_dir" "kube_api_url" "fluidity_namespace" "nats_user" "nats_password" "nats_token" "nats_creds" "nats_nkey_seed" "nats_tls_ca" "nats_tls_cert" "nats_tls_key" -}}
{{- range $name, $_ := .Values.config.extra -}}
{{- if has (lower $name) $reserved -}}
{{- fail (printf "config.extra.%s: this setting has its own value in the chart (secrets come from nats.auth.existingSecret); see values.yaml" $name) -}}
{{- end -}}
{{- end -}}
{{- range $component := include "mlsysops.components" . | fromJsonArray -}}
{{- $as := (index $.Values $component).autoscaling -}}
{{- if $as.enabled -}}
{{- if gt (int $as.minReplicas) (int $as.maxReplicas) -}}
{{- fail (printf "%s.autoscaling: minReplicas (%d) is greater than maxReplicas (%d)" $component (int $as.minReplicas) (int $as.maxReplicas)) -}}
{{- end -}}
{{- if and (not $as.targetCPUUtilizationPercentage) (not $as.targetMemoryUtilizationPercentage) -}}
{{- fail (printf "%s.autoscaling: set targetCPUUtilizationPercentage and/or targetMemoryUtilizationPercentage" $component) -}}
{{- end -}}
{{- end -}}
{{- $pdb := (index $.Values $component).pdb -}}
{{- if and $pdb.create (ne (toString $pdb.minAvailable) "") (ne (toString $pdb.maxUnavailable) "") -}}
{{- fail (printf "%s.pdb: set minAvailable or maxUnavailable, not both" $component) -}}
{{- end -}}
{{- end -}}
{{- end }}
