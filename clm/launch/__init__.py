"""Launching clm on GKE (TPU slices, GPU node pools) and TPU VMs.

job.py     what every launch shares: the command (run_clm.py per TPU host, torchrun per GPU
           node), the runtime environment, the Secrets referenced, the exit codes that restart
xpk.py     python -m clm.launch xpk ...: builds and runs `xpk workload create` (TPU or GPU)
gke.py     python -m clm.launch gke-gpu ...: a JobSet of GPU nodes, applied with kubectl
host.py    python -m clm.launch.host -- CMD: the per-host wrapper on every pod / TPU VM
secrets.py Kubernetes Secrets read from the API server, for launchers that cannot mount them
The Helm chart in helm/ renders the same jobs as JobSets (TPU, or GPU with accelerator=gpu).
"""
