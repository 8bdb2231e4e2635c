"""Launching clm on GKE TPU slices and TPU VMs.

job.py     what every launch shares: the command, the runtime environment per TPU
           generation, the Secrets referenced, the exit codes that restart
xpk.py     python -m clm.launch xpk ...: builds and runs `xpk workload create`
host.py    python -m clm.launch.host -- CMD: the per-host wrapper on every pod / TPU VM
secrets.py Kubernetes Secrets read from the API server, for launchers that cannot mount them
The Helm chart in helm/ renders the same job as a JobSet.
"""
