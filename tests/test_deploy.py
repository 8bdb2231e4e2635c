"""Deployment: the Helm chart (rendered offline by helm-python-sdk, validated against JobSet's
published schema and Kubernetes' own) in its TPU and GPU modes, the gke-gpu launcher (the same
GPU JobSet), the xpk launcher (xpk's own dry run, golden files, TPU and GPU), the per-host
wrapper (real processes, signals, real torchrun and a loopback Kubernetes API), and the exit
codes they share with clm.errors."""

from __future__ import annotations

import argparse
import base64
import copy
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import venv
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from clm import gpu, tpu
from clm.errors import EXIT_OK, EXIT_PREEMPTED, EXIT_USER_ERROR
from clm.launch import gke, job
from clm.launch import xpk as xpk_launcher

helm_python = pytest.importorskip("helm_python", reason="install the test extras: pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm"
JOBSET_SCHEMA = json.loads((ROOT / "tests" / "schemas" / "jobset-v1alpha2.json").read_text())
XPK_GOLDEN = ROOT / "tests" / "golden" / "xpk_dry_run.txt"
XPK_GPU_GOLDEN = ROOT / "tests" / "golden" / "xpk_gpu_dry_run.txt"
XPK_VERSION = "1.16.0"  # the golden file is xpk's output: a new xpk needs a new golden file
KUBERNETES_VERSION = "1.33"
PLANTED = {"HF_TOKEN": "hf_PLANTEDxTOKENxNEVERxSHOWN", "WANDB_API_KEY": "PLANTED0wandb0key0never0shown"}

REPRESENTATIVE_VALUES = {
    "image": "us-docker.pkg.dev/proj/repo/clm:tpu",
    "numSlices": 2,
    "overrides": ["+experiment=gbs256_tpu", "dataset.train_dataset_path=gs://bucket/c4/en_json/3.0.1",
                  "dataset.eval_dataset_path=gs://bucket/c4/en_val_subset_json"],
    "gcsFuse": {"bucket": "bucket"},
    "paths": {"outputDir": "/gcs/outputs", "compileCacheDir": "/gcs/compile_cache",
              "hostErrorDir": "/gcs/host_errors"},
    "serviceAccountName": "clm-runner",
}


# ------------------------------------------------------------------ the Helm chart

def render(values: dict, name: str = "clm-run") -> list[dict]:
    manifests = helm_python.Chart.load(str(CHART)).render(values, name=name)
    return [doc for text in manifests.values() for doc in yaml.safe_load_all(text) if doc]


def validate(manifest: dict) -> None:
    """JobSet against JobSet's CRD schema (vendored, strict); every other object, and each
    replicated job's template as a batch/v1 Job, against Kubernetes' schema (strict)."""
    if manifest["kind"] != "JobSet":
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
        return
    assert manifest["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    jsonschema.Draft7Validator(JOBSET_SCHEMA).validate(manifest)
    for replicated in manifest["spec"]["replicatedJobs"]:
        job_manifest = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": replicated["name"]},
                        **replicated["template"]}
        kubernetes_validate.validate(job_manifest, KUBERNETES_VERSION, strict=True)


def the_jobset(manifests: list[dict]) -> dict:
    (jobset,) = [m for m in manifests if m["kind"] == "JobSet"]
    return jobset


def container_of(jobset: dict) -> dict:
    (replicated,) = jobset["spec"]["replicatedJobs"]
    (container,) = replicated["template"]["spec"]["template"]["spec"]["containers"]
    return container


def test_chart_lints_clean():
    report = helm_python.lint(str(CHART), REPRESENTATIVE_VALUES, strict=True)
    assert report["errors"] == [] and all(m["severity"] < 2 for m in report["messages"]), report


@pytest.mark.parametrize("values", [{}, REPRESENTATIVE_VALUES], ids=["defaults", "representative"])
def test_chart_renders_valid_manifests(values):
    manifests = render(values)
    assert [m["kind"] for m in manifests] == ["JobSet"]
    for manifest in manifests:
        validate(manifest)


def test_schema_check_catches_a_misspelled_field():
    jobset = the_jobset(render(REPRESENTATIVE_VALUES))
    broken = copy.deepcopy(jobset)
    broken["spec"]["failurPolicy"] = broken["spec"].pop("failurePolicy")
    with pytest.raises(jsonschema.ValidationError, match="failurPolicy"):
        validate(broken)
    broken = copy.deepcopy(jobset)
    container_of(broken)["enviroment"] = container_of(broken).pop("env")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


def test_chart_runs_one_pod_per_tpu_host_on_n_slices():
    jobset = the_jobset(render(REPRESENTATIVE_VALUES))
    (replicated,) = jobset["spec"]["replicatedJobs"]
    assert replicated["replicas"] == 2
    spec = replicated["template"]["spec"]
    assert spec["parallelism"] == spec["completions"] == 64  # v5p-512: 256 chips, 4 per host
    pod = spec["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "4x8x8"}
    assert container_of(jobset)["resources"]["limits"] == {"google.com/tpu": 4}
    assert pod["volumes"][0]["csi"] == {"driver": "gcsfuse.csi.storage.gke.io",
                                        "volumeAttributes": {"bucketName": "bucket", "mountOptions": "implicit-dirs"}}


def test_chart_failure_policy_restarts_on_preemption_never_on_a_config_error():
    jobset = the_jobset(render(REPRESENTATIVE_VALUES))
    pod_rules = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["podFailurePolicy"]["rules"]
    (fail_job,) = [rule for rule in pod_rules if rule["action"] == "FailJob"]
    restart_codes = fail_job["onExitCodes"]["values"]
    assert fail_job["onExitCodes"]["operator"] == "NotIn"
    assert restart_codes == list(job.RESTART_EXIT_CODES) == [EXIT_PREEMPTED]
    assert EXIT_USER_ERROR not in restart_codes and EXIT_USER_ERROR in job.NEVER_RESTART_EXIT_CODES
    assert jobset["spec"]["failurePolicy"]["rules"] == [
        {"name": "noRestart", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}]
    # The numbers written in values.yaml's comment are clm.errors' numbers.
    values_text = (CHART / "values.yaml").read_text()
    assert re.search(r"EXIT_PREEMPTED = (\d+)", values_text).group(1) == str(EXIT_PREEMPTED)
    assert re.search(r"EXIT_USER_ERROR = (\d+)", values_text).group(1) == str(EXIT_USER_ERROR)
    assert yaml.safe_load(values_text)["failurePolicy"]["restartOnExitCodes"] == [EXIT_PREEMPTED]


def test_chart_refuses_to_restart_on_a_config_error():
    with pytest.raises(helm_python.HelmError, match="restartOnExitCodes"):
        render({"failurePolicy": {"restartOnExitCodes": [EXIT_PREEMPTED, EXIT_USER_ERROR]}})


def test_chart_runs_the_launchers_command_and_environment(monkeypatch):
    for name, value in PLANTED.items():
        monkeypatch.setenv(name, value)
    manifests = render(REPRESENTATIVE_VALUES)
    container = container_of(the_jobset(manifests))
    paths = REPRESENTATIVE_VALUES["paths"]
    expected = job.Job(overrides=[f"output_dir={paths['outputDir']}", *REPRESENTATIVE_VALUES["overrides"]],
                       num_slices=2, compile_cache_dir=paths["compileCacheDir"],
                       host_error_dir=f"{paths['hostErrorDir']}/clm-run")
    assert container["command"] == expected.argv()
    env = {e["name"]: e for e in container["env"]}
    for name, value in job.runtime_env("v5p-512").items():
        assert env[name]["value"] == value
    for name, key in job.SECRET_KEYS.items():
        assert env[name] == {"name": name, "valueFrom": {"secretKeyRef": {
            "name": job.DEFAULT_SECRET_NAME, "key": key, "optional": True}}}
    assert env["MEGASCALE_NUM_SLICES"]["value"] == "2"
    text = json.dumps(manifests)
    assert not any(value in text for value in PLANTED.values())


def test_launched_overrides_compose_into_a_valid_config():
    from clm.config import load_config

    run = job.Job(overrides=REPRESENTATIVE_VALUES["overrides"], num_slices=2,
                  compile_cache_dir="/gcs/compile_cache")
    cfg = load_config(run.hydra_overrides(), num_devices=256)
    assert cfg.num_slices == 2 and cfg.local_compile_cache_dir == "/gcs/compile_cache"
    assert cfg.model.config_path.endswith("mixtral822.json")


def test_gpu_launched_overrides_compose_into_a_valid_dtensor_config():
    from clm.config import load_config

    run = job.GpuJob(overrides=REPRESENTATIVE_VALUES["overrides"], num_nodes=2, gpus_per_node=8,
                     compile_cache_dir="/gcs/compile_cache")
    asked = []
    cfg = load_config(run.hydra_overrides(), num_devices=lambda engine: asked.append(engine) or 16)
    assert asked == ["dtensor"] and cfg.backend == "dtensor" and cfg.global_train_batch_size == 256


# ------------------------------------------------------------------ the Helm chart's GPU mode and gke-gpu

GPU_VALUES = {**REPRESENTATIVE_VALUES, "image": "us-docker.pkg.dev/proj/repo/clm:gpu", "accelerator": "gpu",
              "gpu": {"type": "h200-141gb", "nodes": 2, "gpusPerNode": 8}}
# python -m clm.launch gke-gpu's arguments for the run GPU_VALUES describe (the chart appends the
# release name to the error directory, the launcher takes it as given)
GKE_GPU_ARGS = ["--gpu-type", "h200-141gb", "--nodes", "2", "--docker-image", GPU_VALUES["image"],
                "--name", "clm-run", "--gcs-bucket", "bucket", "--service-account", "clm-runner",
                "--compile-cache-dir", "/gcs/compile_cache", "--error-dir", "/gcs/host_errors/clm-run",
                "--", "output_dir=/gcs/outputs", *REPRESENTATIVE_VALUES["overrides"]]


def gke_gpu_jobset(args: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    gke.add_arguments(parser)
    return gke.jobset(parser.parse_args(args))


def test_chart_gpu_mode_lints_clean_and_renders_one_valid_jobset():
    report = helm_python.lint(str(CHART), GPU_VALUES, strict=True)
    assert report["errors"] == [] and all(m["severity"] < 2 for m in report["messages"]), report
    for values in (GPU_VALUES, {"accelerator": "gpu"}):
        manifests = render(values)
        assert [m["kind"] for m in manifests] == ["JobSet"]
        validate(manifests[0])


def test_chart_renders_the_jobset_of_gke_gpu():
    """One GPU JobSet: the chart's and `python -m clm.launch gke-gpu`'s are the same object."""
    chart = the_jobset(render(GPU_VALUES))
    assert chart["metadata"]["labels"].pop("helm.sh/chart") == "clm-0.1.0"
    launcher = gke_gpu_jobset(GKE_GPU_ARGS)
    validate(launcher)
    assert launcher == chart


def test_gpu_jobset_runs_torchrun_on_every_node_with_the_coordinator_as_rendezvous():
    jobset = gke_gpu_jobset(GKE_GPU_ARGS)
    (replicated,) = jobset["spec"]["replicatedJobs"]
    spec = replicated["template"]["spec"]
    assert replicated["replicas"] == 1 and spec["parallelism"] == spec["completions"] == 2
    assert spec["completionMode"] == "Indexed"
    # pod 0 of the replicated job is the coordinator, which JobSet names <jobset>-node-0-0.<jobset>
    assert jobset["spec"]["coordinator"] == {"replicatedJob": replicated["name"], "jobIndex": 0, "podIndex": 0}
    pod = spec["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h200-141gb"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    container = container_of(jobset)
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    expected = job.GpuJob(overrides=["output_dir=/gcs/outputs", *REPRESENTATIVE_VALUES["overrides"]],
                          num_nodes=2, gpus_per_node=8, compile_cache_dir="/gcs/compile_cache",
                          host_error_dir="/gcs/host_errors/clm-run")
    assert container["command"] == expected.argv()
    assert container["command"][container["command"].index("--"):][:7] == [
        "--", "torchrun", "--nnodes", "2", "--nproc-per-node", "8", "run_clm.py"]
    assert "backend=dtensor" in container["command"]
    env = {e["name"]: e for e in container["env"]}
    assert env[job.NODE_RANK_ENV]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env[job.MASTER_ADDR_ENV]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['jobset.sigs.k8s.io/coordinator']"
    assert env[job.SHUTDOWN_TIMEOUT_ENV]["value"] == str(pod["terminationGracePeriodSeconds"])
    for name, key in job.SECRET_KEYS.items():
        assert env[name] == {"name": name, "valueFrom": {"secretKeyRef": {
            "name": job.DEFAULT_SECRET_NAME, "key": key, "optional": True}}}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_gpu_jobset_failure_policy_is_the_tpu_ones():
    tpu_jobset, gpu_jobset = the_jobset(render(REPRESENTATIVE_VALUES)), the_jobset(render(GPU_VALUES))
    assert gpu_jobset["spec"]["failurePolicy"] == tpu_jobset["spec"]["failurePolicy"]
    policy = [replicated["template"]["spec"]["podFailurePolicy"]
              for replicated in (tpu_jobset["spec"]["replicatedJobs"][0], gpu_jobset["spec"]["replicatedJobs"][0])]
    assert policy[0] == policy[1]
    assert container_of(gpu_jobset)["name"] == policy[1]["rules"][1]["onExitCodes"]["containerName"]


def test_chart_gpu_values_are_clm_gpus_table():
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert defaults["gpuAcceleratorLabels"] == {name: a.gke_accelerator for name, a in gpu.ACCELERATORS.items()}
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["gpu"]["properties"]
    assert schema["type"]["enum"] == list(gpu.ACCELERATORS)
    assert schema["gpusPerNode"]["maximum"] == max(a.gpus_per_node for a in gpu.ACCELERATORS.values())
    assert defaults["gpu"]["gpusPerNode"] == gpu.accelerator(defaults["gpu"]["type"]).gpus_per_node


@pytest.mark.parametrize("gpu_values", [{"type": "h900"}, {"nodes": 0}, {"gpusPerNode": 16}],
                         ids=["type", "nodes", "gpusPerNode"])
def test_chart_refuses_bad_gpu_values(gpu_values):
    key = next(iter(gpu_values))
    with pytest.raises(helm_python.HelmError, match=key):
        render({"accelerator": "gpu", "gpu": {**GPU_VALUES["gpu"], **gpu_values}})


def run_gke_gpu(args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clm.launch", "gke-gpu", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=120)


def test_gke_gpu_dry_run_prints_the_manifest_without_secrets():
    result = run_gke_gpu([*GKE_GPU_ARGS[:GKE_GPU_ARGS.index("--")], "--dry-run",
                          *GKE_GPU_ARGS[GKE_GPU_ARGS.index("--"):]], **PLANTED)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == gke_gpu_jobset(GKE_GPU_ARGS)
    assert not any(value in result.stdout + result.stderr for value in PLANTED.values())
    assert "&id" not in result.stdout  # plain YAML, no anchors


@pytest.mark.parametrize("bad, flag", [
    (["--gpu-type", "h900"], "--gpu-type 'h900'"),
    (["--nodes", "0"], "--nodes 0"),
    (["--gpus-per-node", "16"], "--gpus-per-node 16"),
], ids=["gpu-type", "nodes", "gpus-per-node"])
def test_gke_gpu_bad_input_is_one_line(bad, flag):
    # argparse keeps the last --gpu-type given
    result = run_gke_gpu(["--gpu-type", "h100-80gb", "--docker-image", "img", "--dry-run", *bad])
    assert result.returncode == EXIT_USER_ERROR
    assert result.stderr.count("\n") == 1 and flag in result.stderr and "Traceback" not in result.stderr


def test_gke_gpu_without_kubectl_is_one_line():
    result = run_gke_gpu(["--gpu-type", "h100-80gb", "--docker-image", "img"], CLM_KUBECTL="/nonexistent/kubectl")
    assert result.returncode == EXIT_USER_ERROR
    assert result.stderr.count("\n") == 1 and "kubectl not found" in result.stderr


# ------------------------------------------------------------------ the xpk launcher

@pytest.fixture(scope="session")
def xpk_bin() -> str:
    """xpk in its own venv: xpk pins older protobuf, google-cloud-storage and PyYAML than clm's
    environment has. Made once per xpk and Python version, outside the clone (a fresh clone, as
    CI's, reuses it: ~/.cache/clm/xpk-VERSION-pyXY), under a lock (test workers may ask at once),
    and trusted only once complete (an interrupted install is made again). CLM_XPK overrides."""
    if os.environ.get("CLM_XPK"):
        return os.environ["CLM_XPK"]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clm"
    env_dir = cache / f"xpk-{XPK_VERSION}-py{sys.version_info.major}{sys.version_info.minor}"
    xpk, complete = env_dir / "bin" / "xpk", env_dir / "complete"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "xpk.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not complete.exists():
            # Built in place (a venv's scripts name their interpreter by absolute path), so a
            # marker says it is whole.
            shutil.rmtree(env_dir, ignore_errors=True)
            venv.create(env_dir, with_pip=True)
            subprocess.run([str(env_dir / "bin" / "pip"), "install", "--quiet", f"xpk=={XPK_VERSION}"], check=True)
            complete.touch()
    return str(xpk)


XPK_ARGS = ["xpk", "--cluster", "tpu-cluster", "--tpu-type", "v5p-512", "--num-slices", "2",
            "--docker-image", "us-docker.pkg.dev/proj/repo/clm:tpu", "--workload", "clm-golden",
            "--project", "proj", "--zone", "us-east5-a", "--storage", "clm-bucket",
            "--compile-cache-dir", "/gcs/compile_cache", "--error-dir", "/gcs/host_errors/clm-golden",
            "--dry-run", "--", "+experiment=gbs256_tpu", "output_dir=/gcs/outputs"]


def run_launcher(args: list[str], xpk: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clm.launch", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "CLM_XPK": xpk, **env}, timeout=120)


@pytest.fixture(scope="session")
def xpk_dry_run(xpk_bin) -> subprocess.CompletedProcess:
    result = run_launcher(XPK_ARGS, xpk_bin, **PLANTED)
    assert result.returncode == 0, result.stderr
    return result


def test_xpk_dry_run_matches_golden_file(xpk_dry_run):
    if os.environ.get("CLM_UPDATE_GOLDEN"):
        XPK_GOLDEN.write_text(xpk_dry_run.stdout)
    assert xpk_dry_run.stdout == XPK_GOLDEN.read_text()


def test_xpk_dry_run_has_our_command_env_and_secret_references_but_no_secret(xpk_dry_run):
    out = xpk_dry_run.stdout + xpk_dry_run.stderr
    assert not any(value in out for value in PLANTED.values())
    command, manifest = out.split("# JobSet manifest\n")
    jobset = yaml.safe_load(manifest)
    assert jobset["kind"] == "JobSet" and jobset["spec"]["replicatedJobs"][0]["replicas"] == 2
    container = container_of(jobset)
    run = job.Job(overrides=["+experiment=gbs256_tpu", "output_dir=/gcs/outputs"], num_slices=2,
                  compile_cache_dir="/gcs/compile_cache", host_error_dir="/gcs/host_errors/clm-golden")
    assert f"({run.command()})" in container["command"][-1]  # inside xpk's bash wrapper
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {**job.runtime_env("v5p-512"),
                   "CLM_SECRET_REFS": "HF_TOKEN=clm-secrets/hf-token,WANDB_API_KEY=clm-secrets/wandb-api-key"}
    # xpk's pod failure policy: FailJob on every code but its restart list, which has ours and not 2.
    (rule,) = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["operator"] == "NotIn"
    assert EXIT_PREEMPTED in rule["onExitCodes"]["values"] and EXIT_USER_ERROR not in rule["onExitCodes"]["values"]
    assert jobset["spec"]["failurePolicy"]["maxRestarts"] == 3


@pytest.mark.parametrize("tpu_type", ["v4-8", "v5p-512", "v5litepod-256", "v6e-256"])
def test_chart_lays_out_a_tpu_type_as_xpk_does(tpu_type, xpk_bin):
    """Same accelerator label, hosts per slice, chips per host and XLA flags for each generation."""
    args = [tpu_type if a == "v5p-512" else a for a in XPK_ARGS]
    result = run_launcher(args, xpk_bin)
    assert result.returncode == 0, result.stderr
    xpk_jobset = yaml.safe_load(result.stdout.split("# JobSet manifest\n")[1])
    xpk_pod = xpk_jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    topology = xpk_pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"]
    chips_per_host = container_of(xpk_jobset)["resources"]["limits"]["google.com/tpu"]
    # xpk lays the generation out as clm.tpu's table says
    generation = tpu.generation(job.tpu_generation(tpu_type))
    assert chips_per_host == generation.chips_per_host
    assert xpk_pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == generation.gke_accelerator
    chart_jobset = the_jobset(render({**REPRESENTATIVE_VALUES, "tpu": {
        "generation": job.tpu_generation(tpu_type), "topology": topology, "chipsPerHost": chips_per_host}}))
    validate(chart_jobset)
    chart_pod = chart_jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert chart_pod["nodeSelector"] == {k: xpk_pod["nodeSelector"][k] for k in chart_pod["nodeSelector"]}
    assert xpk_jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["parallelism"] == \
        chart_jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["parallelism"]
    assert container_of(xpk_jobset)["resources"]["limits"] == container_of(chart_jobset)["resources"]["limits"]
    xpk_env = {e["name"]: e.get("value") for e in container_of(xpk_jobset)["env"]}
    chart_env = {e["name"]: e.get("value") for e in container_of(chart_jobset)["env"]}
    assert chart_env["LIBTPU_INIT_ARGS"] == xpk_env["LIBTPU_INIT_ARGS"]


def test_xpk_launcher_bad_tpu_type_is_one_line(xpk_bin):
    args = [a if a != "v5p-512" else "v9z-8" for a in XPK_ARGS]
    result = run_launcher(args, xpk_bin)
    assert result.returncode == EXIT_USER_ERROR
    assert result.stderr.count("\n") == 1 and "--tpu-type 'v9z-8'" in result.stderr
    result = run_launcher([XPK_ARGS[0], "--num-nodes", "2", *XPK_ARGS[1:]], xpk_bin)
    assert result.returncode == EXIT_USER_ERROR
    assert result.stderr.count("\n") == 1 and "--num-nodes 2: GPU nodes" in result.stderr


XPK_GPU_ARGS = ["xpk", "--cluster", "gpu-cluster", "--device-type", "h100-80gb-8", "--num-nodes", "2",
                "--docker-image", "us-docker.pkg.dev/proj/repo/clm:gpu", "--workload", "clm-gpu-golden",
                "--project", "proj", "--zone", "us-central1-a", "--storage", "clm-bucket",
                "--error-dir", "/gcs/host_errors/clm-gpu-golden",
                "--dry-run", "--", "max_steps=1000", "output_dir=/gcs/outputs"]


@pytest.fixture(scope="session")
def xpk_gpu_dry_run(xpk_bin) -> subprocess.CompletedProcess:
    result = run_launcher(XPK_GPU_ARGS, xpk_bin, **PLANTED)
    assert result.returncode == 0, result.stderr
    return result


def test_xpk_gpu_dry_run_matches_golden_file(xpk_gpu_dry_run):
    if os.environ.get("CLM_UPDATE_GOLDEN"):
        XPK_GPU_GOLDEN.write_text(xpk_gpu_dry_run.stdout)
    assert xpk_gpu_dry_run.stdout == XPK_GPU_GOLDEN.read_text()


def test_xpk_gpu_workload_runs_torchrun_with_xpks_node_rank_and_coordinator(xpk_gpu_dry_run):
    out = xpk_gpu_dry_run.stdout + xpk_gpu_dry_run.stderr
    assert not any(value in out for value in PLANTED.values())
    command, manifest = out.split("# JobSet manifest\n")
    assert "--device-type h100-80gb-8 --num-nodes 2" in command and "--num-slices" not in command
    # (xpk's manifest is xpk's: not checked against the schemas, which its rules' missing names fail)
    jobset = yaml.safe_load(manifest)
    (replicated,) = jobset["spec"]["replicatedJobs"]
    assert replicated["template"]["spec"]["parallelism"] == 2
    container = container_of(jobset)
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    run = job.GpuJob(overrides=["max_steps=1000", "output_dir=/gcs/outputs"], num_nodes=2, gpus_per_node=8,
                     host_error_dir="/gcs/host_errors/clm-gpu-golden")
    assert f"({run.command()})" in container["command"][-1]  # inside xpk's bash wrapper
    # Kubernetes expands $(NAME) only from variables listed before: xpk's come first.
    names = [e["name"] for e in container["env"]]
    env = {e["name"]: e for e in container["env"]}
    for name, value in xpk_launcher.XPK_GPU_ENV.items():
        referenced = re.fullmatch(r"\$\((\w+)\)", value).group(1)
        assert env[name]["value"] == value and names.index(referenced) < names.index(name)
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["JAX_COORDINATOR_ADDRESS"]["value"] == "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME)"
    assert env[job.SHUTDOWN_TIMEOUT_ENV]["value"] == "300"
    assert env["CLM_SECRET_REFS"]["value"] == "HF_TOKEN=clm-secrets/hf-token,WANDB_API_KEY=clm-secrets/wandb-api-key"
    (rule,) = replicated["template"]["spec"]["podFailurePolicy"]["rules"]
    assert rule["onExitCodes"]["containerName"] == container["name"] and rule["onExitCodes"]["operator"] == "NotIn"
    assert EXIT_PREEMPTED in rule["onExitCodes"]["values"] and EXIT_USER_ERROR not in rule["onExitCodes"]["values"]


def test_clm_gpu_table_is_xpks(xpk_bin):
    """Every GPU type xpk knows has clm.gpu's GKE label and GPUs per node (xpk's own table, read
    with xpk's interpreter; a100-80gb is clm's only row xpk lacks)."""
    python = Path(xpk_bin).read_text().splitlines()[0].removeprefix("#!")
    read = ("import json; from xpk.core.system_characteristics import UserFacingNameToSystemCharacteristics as t; "
            "print(json.dumps({k: [s.gke_accelerator, s.chips_per_vm, s.gce_machine_type] for k, s in t.items() "
            "if s.accelerator_type.name == 'GPU'}))")
    xpk_gpus = json.loads(subprocess.run([python, "-c", read], capture_output=True, text=True, check=True).stdout)
    compared = 0
    for device_type, (label, gpus_per_node, machine_type) in xpk_gpus.items():
        parsed = gpu.parse_device_type(device_type)
        if parsed is None or parsed[1] != parsed[0].gpus_per_node:
            continue
        accelerator, gpus = parsed
        assert (accelerator.gke_accelerator, accelerator.gpus_per_node, accelerator.machine_type) == \
            (label, gpus_per_node, machine_type), device_type
        compared += 1
    assert compared == len(gpu.ACCELERATORS) - 1, sorted(xpk_gpus)


@pytest.mark.parametrize("change, message", [
    (("--device-type", "h900-8"), "--device-type 'h900-8'"),
    (("--num-nodes", "0"), "--num-nodes 0"),
    (("--num-slices", "2"), "--num-slices 2: TPU slices"),
], ids=["device-type", "num-nodes", "num-slices"])
def test_xpk_gpu_bad_input_is_one_line(change, message, xpk_bin):
    flag, value = change
    args = list(XPK_GPU_ARGS)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args[1:1] = [flag, value]
    result = run_launcher(args, xpk_bin)
    assert result.returncode == EXIT_USER_ERROR
    assert result.stderr.count("\n") == 1 and message in result.stderr


def test_chart_libtpu_flags_and_accelerator_labels_are_the_launchers():
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert defaults["libtpuInitArgs"] == job.LIBTPU_INIT_ARGS
    assert defaults["acceleratorLabels"] == {name: g.gke_accelerator for name, g in tpu.GENERATIONS.items()}


# ------------------------------------------------------------------ the per-host wrapper

def start_host(index: int, hosts: int, command: list[str], error_dir: Path | None = None, **env):
    wrapper = [sys.executable, "-m", "clm.launch.host"]
    if error_dir is not None:
        wrapper += ["--error-dir", str(error_dir)]
    host_env = {**os.environ, "PYTHONPATH": str(ROOT), "TPU_WORKER_ID": str(index),
                "TPU_WORKER_HOSTNAMES": ",".join(f"host{i}" for i in range(hosts)), **env}
    return subprocess.Popen([*wrapper, "--", *command], cwd=ROOT, env=host_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


HANGS = [sys.executable, "-c", "import time; time.sleep(300)"]  # a host waiting on a dead peer's collective


def test_a_failing_host_fails_the_job_fast_with_its_error_in_process_0s_log(tmp_path):
    """Host 1 dies with a traceback while host 0 waits forever: host 0 stops within seconds,
    prints host 1's error and exits with host 1's code (so the JobSet fails, no hang)."""
    host0 = start_host(0, 2, HANGS, tmp_path)
    time.sleep(0.5)
    started = time.monotonic()
    host1 = start_host(1, 2, [sys.executable, "-c", "raise ValueError('shard 7 is corrupt')"], tmp_path)
    _, err1 = host1.communicate(timeout=60)
    _, err0 = host0.communicate(timeout=60)
    assert host1.returncode == 1 and "ValueError: shard 7 is corrupt" in err1
    assert host0.returncode == 1
    assert "host 1/2" in err0 and "ValueError: shard 7 is corrupt" in err0 and "Traceback" in err0
    assert time.monotonic() - started < 30


def test_a_config_error_on_one_host_stops_every_host_with_exit_2(tmp_path):
    host0 = start_host(0, 2, HANGS, tmp_path)
    host1 = start_host(1, 2, [sys.executable, "run_clm.py", "no_such_knob=1"], tmp_path)
    _, err1 = host1.communicate(timeout=120)
    _, err0 = host0.communicate(timeout=60)
    assert host1.returncode == host0.returncode == EXIT_USER_ERROR
    assert "no_such_knob" in err0


def test_preemption_is_forwarded_and_keeps_its_exit_code(tmp_path):
    trap = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(%d))\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n") % EXIT_PREEMPTED
    host = start_host(0, 1, [sys.executable, "-c", trap], tmp_path)
    assert host.stdout.readline() == "ready\n"
    host.terminate()
    host.communicate(timeout=30)
    assert host.returncode == EXIT_PREEMPTED
    assert list(tmp_path.iterdir()) == []  # a preemption is not an error


def test_errors_left_by_an_earlier_attempt_are_ignored(tmp_path):
    stale = tmp_path / "host-1.err"
    stale.write_text("exit_code=1\nhost 1/2 failed in the previous attempt\n")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    host = start_host(0, 2, [sys.executable, "-c", "import time; time.sleep(2)"], tmp_path)
    _, err = host.communicate(timeout=30)
    assert host.returncode == 0 and "previous attempt" not in err


# ------------------------------------------------------------------ the wrapper around torchrun (GPU nodes)

# A stand-in for run_clm.py under torchrun: it runs through clm.cli.run_command as run_clm.py
# does, and exits with the code its arguments give its rank (RANK=CODE), or, like the trainer
# on SIGTERM, saves for a second and exits 75.
TORCHRUN_WORKER = """
import os, signal, sys, time
from clm.cli import run_command
from clm.errors import EXIT_PREEMPTED

def main():
    rank = os.environ["RANK"]
    print(f"worker rank={rank} world={os.environ['WORLD_SIZE']} node={os.environ['GROUP_RANK']}", flush=True)
    codes = dict(arg.split("=", 1) for arg in sys.argv[1:])
    if rank in codes:
        return int(codes[rank])
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    print("ready", flush=True)
    while not stop:
        time.sleep(0.1)
    time.sleep(1)
    return EXIT_PREEMPTED

sys.exit(run_command(main))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gpu_node(tmp_path: Path, node: int, run: job.GpuJob, port: int) -> subprocess.Popen:
    """One GPU pod's command on this machine: GpuJob's argv with this interpreter, torchrun as
    `python -m torch.distributed.run` and the stand-in for run_clm.py; node rank and rendezvous
    host as the JobSet gives them, in torchrun's PET_ variables."""
    worker = tmp_path / "worker.py"
    worker.write_text(TORCHRUN_WORKER)
    replace = {"python": [sys.executable], "torchrun": [sys.executable, "-m", "torch.distributed.run"],
               "run_clm.py": [str(worker)]}
    argv = [part for arg in run.argv() for part in replace.get(arg, [arg])]
    env = {**os.environ, "PYTHONPATH": str(ROOT), job.NODE_RANK_ENV: str(node), job.MASTER_ADDR_ENV: "127.0.0.1",
           "PET_MASTER_PORT": str(port)}
    return subprocess.Popen(argv, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def test_torchrun_nodes_rendezvous_from_the_pod_environment(tmp_path):
    """Two nodes of two GPUs: four workers, ranks 0-3, node ranks from PET_NODE_RANK."""
    run = job.GpuJob(overrides=["0=0", "1=0", "2=0", "3=0"], num_nodes=2, gpus_per_node=2)
    port = free_port()
    nodes = [start_gpu_node(tmp_path, node, run, port) for node in (1, 0)]
    outs = [node.communicate(timeout=180) for node in nodes]
    assert [node.returncode for node in nodes] == [EXIT_OK, EXIT_OK], outs
    # (a node's workers share its stdout, and unbuffered prints of two workers can interleave)
    seen = sorted(re.findall(r"worker rank=\d+ world=\d+ node=\d+", "".join(out for out, _ in outs)))
    assert seen == [f"worker rank={r} world=4 node={r // 2}" for r in range(4)]


def test_a_workers_config_error_is_the_nodes_exit_code_not_torchruns_1(tmp_path):
    """Rank 1 exits 2; torchrun stops rank 0 (which then exits 75) and exits 1 itself: the node
    exits 2, and a preemption never hides a failure."""
    node = start_gpu_node(tmp_path, 0, job.GpuJob(overrides=["1=2"], num_nodes=1, gpus_per_node=2), free_port())
    _, err = node.communicate(timeout=180)
    assert node.returncode == EXIT_USER_ERROR, err
    assert "ChildFailedError" in err  # torchrun's own report, passed through


def test_a_preempted_node_exits_75_through_torchrun(tmp_path):
    """SIGTERM to the pod's wrapper reaches the workers through torchrun; they save and exit 75,
    torchrun exits 1, the node exits 75: JobSet restarts the job."""
    node = start_gpu_node(tmp_path, 0, job.GpuJob(overrides=[], num_nodes=1, gpus_per_node=2), free_port())
    ready = 0
    while ready < 2:
        line = node.stdout.readline()
        assert line, node.stderr.read()
        ready += line.count("ready")  # the two workers' lines may interleave
    node.send_signal(signal.SIGTERM)
    _, err = node.communicate(timeout=120)
    assert node.returncode == EXIT_PREEMPTED, err


def test_job_exit_code_prefers_a_failure_then_a_preemption_then_the_commands_own():
    from clm.launch.host import job_exit_code

    assert job_exit_code(EXIT_OK, [1]) == EXIT_OK
    assert job_exit_code(1, [EXIT_PREEMPTED, EXIT_USER_ERROR, EXIT_PREEMPTED]) == EXIT_USER_ERROR
    assert job_exit_code(1, [EXIT_PREEMPTED, EXIT_OK]) == EXIT_PREEMPTED
    assert job_exit_code(137, []) == 137  # a worker killed by a signal leaves no code


class FakeKubernetesApi(BaseHTTPRequestHandler):
    """The Secrets endpoint of the Kubernetes API (GET /api/v1/namespaces/NS/secrets/NAME)."""

    secrets: dict = {}
    token = "service-account-token"

    def do_GET(self):
        match = re.fullmatch(r"/api/v1/namespaces/([^/]+)/secrets/([^/]+)", self.path)
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            self.send_response(401)
        elif not match or match.groups() not in self.secrets:
            self.send_response(403)  # RBAC: this service account may get only its own Secret
        else:
            data = {k: base64.b64encode(v.encode()).decode() for k, v in self.secrets[match.groups()].items()}
            body = json.dumps({"kind": "Secret", "data": data}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)
            return
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def kubernetes_api(tmp_path):
    FakeKubernetesApi.secrets = {("team", "clm-secrets"): {"hf-token": PLANTED["HF_TOKEN"]}}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKubernetesApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(FakeKubernetesApi.token)
    (account / "namespace").write_text("team")
    yield {"CLM_KUBERNETES_API": f"http://127.0.0.1:{server.server_port}", "CLM_SERVICE_ACCOUNT_DIR": str(account)}
    server.shutdown()


def test_host_resolves_secret_references_without_showing_them(kubernetes_api):
    check = ("import os, sys\n"
             f"ok = os.environ.get('HF_TOKEN') == {PLANTED['HF_TOKEN']!r} and 'WANDB_API_KEY' not in os.environ\n"
             "sys.exit(0 if ok and 'CLM_SECRET_REFS' not in os.environ else 3)\n")
    refs = "HF_TOKEN=clm-secrets/hf-token,WANDB_API_KEY=clm-secrets/wandb-api-key"
    env = {k: v for k, v in os.environ.items() if k not in PLANTED}
    host = subprocess.run([sys.executable, "-m", "clm.launch.host", "--", sys.executable, "-c", check],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**env, "PYTHONPATH": str(ROOT), "CLM_SECRET_REFS": refs, **kubernetes_api})
    assert host.returncode == 0, host.stderr
    assert PLANTED["HF_TOKEN"] not in host.stdout + host.stderr
    assert "WANDB_API_KEY not set" in host.stderr  # the optional key is absent from the Secret


def test_host_without_permission_on_the_secret_is_one_line(kubernetes_api):
    env = {k: v for k, v in os.environ.items() if k not in PLANTED}
    host = subprocess.run([sys.executable, "-m", "clm.launch.host", "--", "true"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**env, "PYTHONPATH": str(ROOT),
                                                      "CLM_SECRET_REFS": "HF_TOKEN=other-secret/hf-token",
                                                      **kubernetes_api})
    assert host.returncode == EXIT_USER_ERROR
    assert host.stderr.count("\n") == 1 and "may not read Secret team/other-secret" in host.stderr


def test_missing_xpk_or_command_is_one_line():
    launcher = run_launcher(XPK_ARGS, "/nonexistent/xpk")
    assert launcher.returncode == EXIT_USER_ERROR
    assert launcher.stderr.count("\n") == 1 and "CLM_XPK=/nonexistent/xpk" in launcher.stderr
    host = subprocess.run([sys.executable, "-m", "clm.launch.host", "--", "no-such-command"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert host.returncode == EXIT_USER_ERROR and host.stderr.count("\n") == 1


def test_host_index_follows_slices_then_workers():
    from clm.launch.host import host_index

    gke = {"TPU_WORKER_ID": "3", "TPU_WORKER_HOSTNAMES": "a,b,c,d", "MEGASCALE_SLICE_ID": "1",
           "MEGASCALE_NUM_SLICES": "2"}
    assert host_index(gke) == (7, 8)
    assert host_index({"TPU_WORKER_ID": "2"}) == (2, None)  # a TPU VM container: count unknown
    assert host_index({}) == (0, None)
    assert host_index({job.NODE_RANK_ENV: "3"}) == (3, None)  # a GPU node: torchrun's node rank
