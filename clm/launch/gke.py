"""python -m clm.launch gke-gpu: a JobSet of GPU nodes, applied with kubectl.

One replicated job of --nodes pods, one pod per GPU node (`nvidia.com/gpu` limits, GKE's
accelerator label as node selector, the GPU nodes' taint tolerated). Every pod runs
clm.launch.job.GpuJob's command: the host wrapper, then torchrun with --nproc-per-node = GPUs
per node and --nnodes = pods, which starts run_clm.py backend=dtensor once per GPU. torchrun's
node rank is the pod's completion index and its rendezvous host the JobSet's coordinator
(pod 0, `<jobset>-node-0-0.<jobset>` through the JobSet's headless service), both read from
the pod's annotations into torchrun's PET_ variables. HF_TOKEN and WANDB_API_KEY are
`secretKeyRef`s to the Secret, never values. The failure policy is the TPU chart's: exit 75 or
a GKE eviction restarts every pod (up to --max-restarts), any other exit code fails the
JobSet. The Helm chart's GPU mode (accelerator=gpu) renders the same JobSet
(tests/test_deploy.py compares them).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import time

import yaml

from clm.errors import UserError
from clm.launch import job

KUBECTL_ENV = "CLM_KUBECTL"  # the kubectl executable, when it is not `kubectl` on PATH
REPLICATED_JOB = "node"
CONTAINER = "clm"  # the podFailurePolicy's exit-code rule names it
GCS_MOUNT_PATH = "/gcs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu-type", required=True, help="one of clm/gpu.py's: h100-80gb, h200-141gb, b200, ...")
    parser.add_argument("--nodes", type=int, default=1, help="GPU nodes: one pod each (torchrun's --nnodes)")
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="trainer processes per pod (default: all GPUs of the GPU type's machine type)")
    parser.add_argument("--docker-image", required=True,
                        help="the image of docker/gpu/Dockerfile (docker/build_and_push_image.sh prints it)")
    parser.add_argument("--name", default=None, help="JobSet name (default clm-MMDD-HHMMSS)")
    parser.add_argument("--namespace", default=None, help="kubectl's namespace (default: the context's)")
    parser.add_argument("--max-restarts", type=int, default=3, help="JobSet restarts after a preemption")
    parser.add_argument("--grace-period", type=int, default=300,
                        help="seconds a pod gets after SIGTERM to finish its checkpoint")
    parser.add_argument("--secret", default=job.DEFAULT_SECRET_NAME,
                        help="Kubernetes Secret with keys " + ", ".join(job.SECRET_KEYS.values()))
    parser.add_argument("--gcs-bucket", default=None,
                        help=f"a Cloud Storage bucket mounted at {GCS_MOUNT_PATH} with the GCS FUSE CSI driver")
    parser.add_argument("--service-account", default=None,
                        help="Kubernetes service account of the pods (Workload Identity access to the bucket)")
    parser.add_argument("--compile-cache-dir", default=None,
                        help="compile cache shared by all nodes and launches, e.g. /gcs/compile_cache")
    parser.add_argument("--error-dir", default=None,
                        help="shared directory where a failing node leaves its error for the others")
    parser.add_argument("--dry-run", action="store_true", help="print the JobSet manifest; contact no cluster")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="-- Hydra overrides for run_clm.py")


def gpus_per_node(gpu_type: str, requested: int | None) -> int:
    accelerator = job.gpu_accelerator(gpu_type)
    if requested is None:
        return accelerator.gpus_per_node
    if not 1 <= requested <= accelerator.gpus_per_node:
        raise UserError(f"--gpus-per-node {requested}: {gpu_type} nodes ({accelerator.machine_type}) have "
                        f"1 to {accelerator.gpus_per_node} GPUs")
    return requested


def annotation(key: str) -> dict:
    return {"valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{key}']"}}}


def jobset(args: argparse.Namespace) -> dict:
    """The JobSet of the run `args` describe."""
    overrides = args.overrides[1:] if args.overrides[:1] == ["--"] else args.overrides
    if args.nodes < 1:
        raise UserError(f"--nodes {args.nodes}: must be at least 1")
    gpus = gpus_per_node(args.gpu_type, args.gpus_per_node)
    name = args.name or time.strftime("clm-%m%d-%H%M%S")
    run = job.GpuJob(overrides=overrides, num_nodes=args.nodes, gpus_per_node=gpus,
                     compile_cache_dir=args.compile_cache_dir, host_error_dir=args.error_dir)
    labels = {"app.kubernetes.io/name": "clm", "app.kubernetes.io/instance": name}
    env = [
        # torchrun's node rank: the pod's index in its Job (Indexed completion mode)
        {"name": job.NODE_RANK_ENV, **annotation("batch.kubernetes.io/job-completion-index")},
        # torchrun's rendezvous host: pod 0's stable name, <jobset>-node-0-0.<jobset>
        {"name": job.MASTER_ADDR_ENV, **annotation("jobset.sigs.k8s.io/coordinator")},
        *({"name": key, "value": value} for key, value in job.gpu_runtime_env(args.grace_period).items()),
        # credentials: references to the Secret, never values
        *({"name": env_name, "valueFrom": {"secretKeyRef": {"name": args.secret, "key": key, "optional": True}}}
          for env_name, key in job.SECRET_KEYS.items()),
    ]
    # NCCL's and torch's shared-memory transports outgrow the container runtime's 64 MB /dev/shm.
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    if args.gcs_bucket:
        mounts.append({"name": "gcs", "mountPath": GCS_MOUNT_PATH})
        volumes.append({"name": "gcs", "csi": {"driver": "gcsfuse.csi.storage.gke.io", "volumeAttributes": {
            "bucketName": args.gcs_bucket, "mountOptions": "implicit-dirs"}}})
    pod_spec = {
        "restartPolicy": "Never",
        **({"serviceAccountName": args.service_account} if args.service_account else {}),
        "terminationGracePeriodSeconds": args.grace_period,
        "nodeSelector": {"cloud.google.com/gke-accelerator": job.gpu_accelerator(args.gpu_type).gke_accelerator},
        # GKE taints GPU nodes nvidia.com/gpu=present:NoSchedule
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [{
            "name": CONTAINER,
            "image": args.docker_image,
            "imagePullPolicy": "IfNotPresent",
            "command": run.argv(),
            "env": env,
            "resources": {"limits": {"nvidia.com/gpu": gpus}},
            "volumeMounts": mounts,
        }],
        "volumes": volumes,
    }
    # a copy: the same dict twice would come out of yaml.safe_dump as an anchor and an alias
    pod_metadata = {"labels": dict(labels), **({"annotations": {"gke-gcsfuse/volumes": "true"}} if args.gcs_bucket else {})}
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "failurePolicy": {
                "maxRestarts": args.max_restarts,
                "rules": [
                    # A pod failure policy said FailJob (an exit code that must not restart): fail the JobSet.
                    {"name": "noRestart", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]},
                    # Anything else (exit 75, eviction) restarts every pod, up to maxRestarts.
                ],
            },
            # every pod's jobset.sigs.k8s.io/coordinator annotation names pod 0: torchrun's rendezvous
            "coordinator": {"replicatedJob": REPLICATED_JOB, "jobIndex": 0, "podIndex": 0},
            "replicatedJobs": [{
                "name": REPLICATED_JOB,
                "replicas": 1,
                "template": {"spec": {
                    "parallelism": args.nodes,
                    "completions": args.nodes,
                    "completionMode": "Indexed",
                    # one failed node fails its Job at once, and with it the JobSet (no silent hang)
                    "backoffLimit": 0,
                    "podFailurePolicy": {"rules": [
                        # GKE evicted the pod (spot preemption, maintenance): restart, whatever the exit code
                        {"action": "Count", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                        # every exit code but the preemption code(s) is final: 2 = bad config, 1 = a bug
                        {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "NotIn",
                                                              "values": list(job.RESTART_EXIT_CODES)}},
                    ]},
                    "template": {"metadata": pod_metadata, "spec": pod_spec},
                }},
            }],
        },
    }


def kubectl_executable() -> str:
    kubectl = shutil.which(os.environ.get(KUBECTL_ENV) or "kubectl")
    if not kubectl:
        raise UserError(f"kubectl not found ({KUBECTL_ENV}={os.environ.get(KUBECTL_ENV) or 'unset'}): install it "
                        f"(gcloud components install kubectl) and run `gcloud container clusters get-credentials "
                        f"CLUSTER`, or set {KUBECTL_ENV}=/path/to/kubectl")
    return kubectl


def launch(args: argparse.Namespace) -> int:
    manifest = yaml.safe_dump(jobset(args), sort_keys=False)
    if args.dry_run:
        print(manifest, end="")
        return 0
    argv = [kubectl_executable(), "apply", "-f", "-"]
    if args.namespace:
        argv += ["--namespace", args.namespace]
    print("$ " + shlex.join(argv), flush=True)
    return subprocess.run(argv, input=manifest, text=True).returncode
