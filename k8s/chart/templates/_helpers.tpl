{{/*
Names. The full name is capped at 40 characters: KubeRay derives the RayCluster
(<name>-<5 chars>) and its Services (<cluster>-head-svc, <name>-serve-svc) from the
RayService's name, and those must stay valid 63-character DNS labels.
*/}}
{{- define "disagg.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "disagg.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "disagg.eppName" -}}
{{- printf "%s-epp" (include "disagg.fullname" .) -}}
{{- end -}}

{{/*
The endpoint picker's ext_proc port: its container port's name says whether it serves TLS
(--secure-serving) or plaintext HTTP/2; the Service's port (grpc-ext-proc) targets it by name.
The certificate Secret (epp.tls.certSecretName) is mounted at eppCertPath, beside the config
mount rather than under it: a volume nested in a configMap volume is fragile.
*/}}
{{- define "disagg.eppExtProcPortName" -}}
{{- ternary "ext-proc-tls" "ext-proc-h2c" .Values.epp.tls.secureServing -}}
{{- end -}}

{{- define "disagg.eppCertPath" -}}/etc/disagg-epp-tls{{- end -}}

{{/* The endpoint picker Service's name in the cluster's DNS. */}}
{{- define "disagg.eppServiceHost" -}}
{{- printf "%s.%s.svc.cluster.local" (include "disagg.eppName" .) .Release.Namespace -}}
{{- end -}}

{{- define "disagg.internalTokenSecret" -}}
{{- default (printf "%s-internal-token" (include "disagg.fullname" .)) .Values.internalToken.secretName -}}
{{- end -}}

{{- define "disagg.gatewayName" -}}
{{- default (include "disagg.fullname" .) .Values.gateway.name -}}
{{- end -}}

{{- define "disagg.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "disagg.eppImage" -}}
{{- $img := mergeOverwrite (deepCopy .Values.image) .Values.epp.image -}}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "disagg.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "disagg.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: disagg
{{- end -}}

{{- define "disagg.selectorLabels" -}}
app.kubernetes.io/name: {{ include "disagg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
The pool label: every prefill and decode pod of this release carries it, so the endpoint
picker discovers the workers with one equality selector and reads each pod's role from
disagg.io/role. The InferencePool adds disagg.io/role=decode to it.
*/}}
{{- define "disagg.poolLabelKey" -}}disagg.io/pool{{- end -}}
{{- define "disagg.roleLabelKey" -}}disagg.io/role{{- end -}}

{{- define "disagg.workerSelector" -}}
{{- printf "%s=%s" (include "disagg.poolLabelKey" .) (include "disagg.fullname" .) -}}
{{- end -}}

{{/* Labels of one role's worker pods; call with (dict "root" $ "role" "prefill"). */}}
{{- define "disagg.workerPodLabels" -}}
{{ include "disagg.selectorLabels" .root }}
app.kubernetes.io/component: {{ .role }}
{{ include "disagg.poolLabelKey" .root }}: {{ include "disagg.fullname" .root }}
{{ include "disagg.roleLabelKey" .root }}: {{ .role }}
{{- end -}}

{{/* The custom Ray resource a role's pods advertise, one unit per pod. */}}
{{- define "disagg.rayResource" -}}
{{- printf "disagg_%s" . -}}
{{- end -}}

{{/*
The AppConfig (disagg/config.py) as YAML: the Serve application's args and the endpoint
picker's --config file. The chart derives what the cluster's shape decides (replicas, GPUs,
ports, placement); `config` supplies any other field and never overrides a derived one.
*/}}
{{- define "disagg.appConfig" -}}
{{- $v := .Values -}}
{{- $cfg := dict
  "model" $v.model.path
  "dtype" $v.model.dtype
  "max_model_len" (int $v.model.maxModelLen)
  "block_size" (int $v.engine.blockSize)
  "max_num_seqs" (int $v.engine.maxNumSeqs)
  "enforce_eager" $v.engine.enforceEager
  "kv_connector" $v.engine.kvConnector
  "kv_backend" $v.engine.kvBackend
  "host" "0.0.0.0"
  "port" (int $v.serve.port)
  "routing" (dict "pd_threshold_tokens" (int $v.routing.pdThresholdTokens))
-}}
{{- if $v.model.servedName -}}
{{- $_ := set $cfg "served_model_name" $v.model.servedName -}}
{{- end -}}
{{- if $v.engine.maxNumBatchedTokens -}}
{{- $_ := set $cfg "max_num_batched_tokens" (int $v.engine.maxNumBatchedTokens) -}}
{{- end -}}
{{- range $role := list "prefill" "decode" -}}
{{- $r := index $v $role -}}
{{- $_ := set $cfg $role (dict
  "replicas" (int $r.replicas)
  "cpu_bind" (list)
  "http_port" (int $v.workerPort)
  "ray_num_gpus" (int $r.gpus)
  "ray_resources" (dict (include "disagg.rayResource" $role) 1)
) -}}
{{- end -}}
{{- toYaml (mustMerge $cfg (deepCopy $v.config)) -}}
{{- end -}}

{{/* Ray's rayStartParams `resources` string: a JSON object, quoted once more for `ray start`. */}}
{{- define "disagg.rayStartResources" -}}
{{- dict (include "disagg.rayResource" .) 1 | toJson | quote -}}
{{- end -}}

{{/*
A worker group (KubeRay workerGroupSpecs item); call with (dict "root" $ "role" "prefill").
minReplicas = maxReplicas = replicas: the Serve deployment has exactly one replica per pod.
*/}}
{{- define "disagg.workerGroup" -}}
{{- $root := .root -}}
{{- $role := .role -}}
{{- $r := index $root.Values $role -}}
{{- $res := deepCopy $r.resources -}}
{{- if gt (int $r.gpus) 0 -}}
{{- $limits := default dict $res.limits -}}
{{- $requests := default dict $res.requests -}}
{{- $_ := set $limits $root.Values.gpuResourceName (int $r.gpus) -}}
{{- $_ := set $requests $root.Values.gpuResourceName (int $r.gpus) -}}
{{- $_ := set $res "limits" $limits -}}
{{- $_ := set $res "requests" $requests -}}
{{- end -}}
- groupName: {{ $role }}
  replicas: {{ int $r.replicas }}
  minReplicas: {{ int $r.replicas }}
  maxReplicas: {{ int $r.replicas }}
  rayStartParams:
    resources: {{ include "disagg.rayStartResources" $role | quote }}
    num-gpus: {{ int $r.gpus | quote }}
    metrics-export-port: {{ $root.Values.ray.metricsPort | quote }}
  template:
    metadata:
      labels:
        {{- include "disagg.workerPodLabels" (dict "root" $root "role" $role) | nindent 8 }}
    spec:
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "disagg.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          env:
            - name: POD_IP
              valueFrom:
                fieldRef:
                  fieldPath: status.podIP
            # Peers reach this pod's KV transfer agent at its pod IP, not loopback.
            - name: VLLM_NIXL_SIDE_CHANNEL_HOST
              value: $(POD_IP)
            - name: DISAGG_ROLE
              value: {{ $role }}
            # Decode's calls to prefill's /internal/prefill carry it, and prefill asks for it.
            - name: DISAGG_INTERNAL_TOKEN
              valueFrom:
                secretKeyRef:
                  name: {{ include "disagg.internalTokenSecret" $root }}
                  key: token
            {{- with $r.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            - name: worker
              containerPort: {{ int $root.Values.workerPort }}
              protocol: TCP
            - name: metrics
              containerPort: {{ int $root.Values.ray.metricsPort }}
              protocol: TCP
            # Serve runs a proxy on every node (proxy_location: EveryNode).
            - name: serve
              containerPort: {{ int $root.Values.serve.port }}
              protocol: TCP
          resources:
            {{- toYaml $res | nindent 12 }}
          volumeMounts:
            {{- include "disagg.volumeMounts" $root | nindent 12 }}
      volumes:
        {{- include "disagg.volumes" (dict "root" $root "shmSize" $r.shmSize) | nindent 8 }}
      {{- with $r.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $r.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $r.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}

{{- define "disagg.volumeMounts" -}}
- name: ray-logs
  mountPath: /tmp/ray
- name: dshm
  mountPath: /dev/shm
{{- if .Values.model.storage.volume }}
- name: model
  mountPath: {{ .Values.model.storage.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Call with (dict "root" $ "shmSize" "16Gi"). */}}
{{- define "disagg.volumes" -}}
- name: ray-logs
  emptyDir: {}
- name: dshm
  emptyDir:
    medium: Memory
    {{- with .shmSize }}
    sizeLimit: {{ . }}
    {{- end }}
{{- with .root.Values.model.storage.volume }}
- name: model
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The picker's own pods, as a label selector string: its replicas find each other by it. */}}
{{- define "disagg.eppSelector" -}}
{{- $labels := include "disagg.selectorLabels" . | fromYaml -}}
{{- $parts := list -}}
{{- range $k, $v := $labels }}{{ $parts = append $parts (printf "%s=%s" $k $v) }}{{ end -}}
{{- $parts = append $parts "app.kubernetes.io/component=epp" -}}
{{- join "," $parts -}}
{{- end -}}
