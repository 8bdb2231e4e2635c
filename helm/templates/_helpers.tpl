{{/* Hosts per slice: the product of the topology's dimensions over the chips per host. */}}
{{- define "clm.hostsPerSlice" -}}
{{- $chips := 1 -}}
{{- range splitList "x" .Values.tpu.topology -}}
{{- $chips = mul $chips (atoi .) -}}
{{- end -}}
{{- div $chips .Values.tpu.chipsPerHost -}}
{{- end -}}

{{/* The command of every host: the same as clm.launch.job.Job.argv() (tests/test_deploy.py). */}}
{{- define "clm.command" -}}
- python
- -m
- clm.launch.host
{{- with .Values.paths.hostErrorDir }}
- --error-dir
- {{ printf "%s/%s" . $.Release.Name | quote }}
{{- end }}
- --
- python
- run_clm.py
- {{ printf "num_slices=%d" (int .Values.numSlices) | quote }}
{{- with .Values.paths.compileCacheDir }}
- {{ printf "local_compile_cache_dir=%s" . | quote }}
{{- end }}
{{- with .Values.paths.outputDir }}
- {{ printf "output_dir=%s" . | quote }}
{{- end }}
{{- with .Values.paths.checkpointDir }}
- {{ printf "checkpoint_dir=%s" . | quote }}
{{- end }}
{{- range .Values.overrides }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{/* The command of every GPU node: the same as clm.launch.job.GpuJob.argv() (tests/test_deploy.py). */}}
{{- define "clm.gpuCommand" -}}
- python
- -m
- clm.launch.host
{{- with .Values.paths.hostErrorDir }}
- --error-dir
- {{ printf "%s/%s" . $.Release.Name | quote }}
{{- end }}
- --
- torchrun
- --nnodes
- {{ int .Values.gpu.nodes | toString | quote }}
- --nproc-per-node
- {{ int .Values.gpu.gpusPerNode | toString | quote }}
- run_clm.py
- backend=dtensor
{{- with .Values.paths.compileCacheDir }}
- {{ printf "local_compile_cache_dir=%s" . | quote }}
{{- end }}
{{- with .Values.paths.outputDir }}
- {{ printf "output_dir=%s" . | quote }}
{{- end }}
{{- with .Values.paths.checkpointDir }}
- {{ printf "checkpoint_dir=%s" . | quote }}
{{- end }}
{{- range .Values.overrides }}
- {{ . | quote }}
{{- end }}
{{- end -}}
