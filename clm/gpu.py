"""GPU machine types on GKE: the one table of the facts that the GPU launchers (clm.launch
gke-gpu, clm.launch xpk --device-type, the Helm chart's GPU mode) use. Plain data, no torch.

Sources:
- GKE's accelerator label (node selector cloud.google.com/gke-accelerator) and the machine
  type with its GPUs per node: GKE's GPU pages (cloud.google.com/kubernetes-engine/docs/
  concepts/gpus) and Compute Engine's accelerator-optimized machines (cloud.google.com/
  compute/docs/accelerator-optimized-machines): A3 High a3-highgpu-8g, A3 Mega
  a3-megagpu-8g, A3 Ultra a3-ultragpu-8g, A4 a4-highgpu-8g, A2 Ultra a2-ultragpu-8g,
  A2 Standard a2-highgpu-8g, 8 GPUs each. xpk 1.16.0's table
  (xpk/core/system_characteristics.py) has the same labels and counts for the types it knows
  (all but a100-80gb); tests/test_deploy.py compares them.
- HBM per GPU and dense (not 2:4 sparse) bf16 tensor-core peak: NVIDIA's datasheets (H100 SXM
  80 GB, 989 TFLOP/s; H200 SXM 141 GB, 989; A100 SXM 80/40 GB, 312; HGX B200, 2250 per GPU)
  and, for B200, Google's A4 page (1,440 GB of HBM3e for 8 GPUs: 180 GB each).
The names are xpk's device types without the GPU count: xpk's h100-80gb-8 is h100-80gb on
8-GPU nodes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Accelerator:
    name: str
    gke_accelerator: str  # GKE's cloud.google.com/gke-accelerator label (helm/values.yaml repeats it)
    machine_type: str  # the usual GKE machine type of a multi-node training job
    gpus_per_node: int  # GPUs of that machine type: one pod per node, one torchrun process per GPU
    hbm_gb: float  # HBM per GPU, GB
    peak_bf16_tflops: float  # dense bf16 tensor-core peak per GPU: MFU's denominator


ACCELERATORS = {a.name: a for a in (
    Accelerator("h100-80gb", "nvidia-h100-80gb", "a3-highgpu-8g", 8, 80, 989.0),
    Accelerator("h100-mega-80gb", "nvidia-h100-mega-80gb", "a3-megagpu-8g", 8, 80, 989.0),
    Accelerator("h200-141gb", "nvidia-h200-141gb", "a3-ultragpu-8g", 8, 141, 989.0),
    Accelerator("b200", "nvidia-b200", "a4-highgpu-8g", 8, 180, 2250.0),
    Accelerator("a100-80gb", "nvidia-a100-80gb", "a2-ultragpu-8g", 8, 80, 312.0),
    Accelerator("a100-40gb", "nvidia-tesla-a100", "a2-highgpu-8g", 8, 40, 312.0),
)}


def accelerator(name: str) -> Accelerator | None:
    """The accelerator called `name`, None for anything else."""
    return ACCELERATORS.get(name)


def parse_device_type(text: str) -> tuple[Accelerator, int] | None:
    """(accelerator, GPUs per node) of an xpk device type such as 'h100-80gb-8'; None if `text`
    is not one."""
    match = re.fullmatch(r"(.+)-(\d+)", text)
    found = accelerator(match.group(1)) if match else None
    if found is None:
        return None
    return found, int(match.group(2))


def names() -> str:
    return ", ".join(ACCELERATORS)
