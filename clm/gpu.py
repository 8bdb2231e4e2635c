"""GPUs: the one table of the GPU facts clm uses. Plain data, no torch.

Two tables:
- CHIPS, the GPU kinds (what a run reports as its device kind: MFU's denominator and MLPerf's
  platform), each with the pattern that recognises it in torch.cuda.get_device_name's answer
  ("NVIDIA H100 80GB HBM3", "AMD Instinct MI355X") and its dense bf16 peak.
- ACCELERATORS, GKE's GPU machine types, which the GPU launchers use (clm.launch gke-gpu,
  clm.launch xpk --device-type, the Helm chart's GPU mode), each naming its chip.

Sources:
- Dense (not 2:4 sparse) bf16 tensor-core peak per GPU, from the vendors' datasheets, which
  state the sparse figure (twice the dense one) unless marked: NVIDIA A100 (312 dense, SXM and
  PCIe alike); H100 (SXM 1,979 sparse: 989; PCIe 1,513: 756; NVL 1,671: 835); H200 (SXM
  1,979: 989; NVL 1,671: 835); HGX B200 and HGX B300 (36 PFLOP/s sparse for 8 GPUs: 2,250
  each); GB200 NVL72 and GB300 NVL72 (360 PFLOP/s sparse for 72 GPUs: 2,500 each). AMD
  Instinct product pages (dense, "peak bfloat16"): MI300X and MI325X 1,307.4; MI350X 2,306.9;
  MI355X 2,516.6 TFLOP/s.
- GKE's accelerator label (node selector cloud.google.com/gke-accelerator) and the machine
  type with its GPUs per node: GKE's GPU pages (cloud.google.com/kubernetes-engine/docs/
  concepts/gpus) and Compute Engine's accelerator-optimized machines (cloud.google.com/
  compute/docs/accelerator-optimized-machines): A3 High a3-highgpu-8g, A3 Mega
  a3-megagpu-8g, A3 Ultra a3-ultragpu-8g, A4 a4-highgpu-8g, A2 Ultra a2-ultragpu-8g,
  A2 Standard a2-highgpu-8g, 8 GPUs each. xpk 1.16.0's table
  (xpk/core/system_characteristics.py) has the same labels and counts for the types it knows
  (all but a100-80gb); tests/test_deploy.py compares them.
- HBM per GPU: NVIDIA's datasheets (H100 SXM 80 GB, H200 SXM 141 GB, A100 80/40 GB) and, for
  B200, Google's A4 page (1,440 GB of HBM3e for 8 GPUs: 180 GB each).
The machine types' names are xpk's device types without the GPU count: xpk's h100-80gb-8 is
h100-80gb on 8-GPU nodes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Chip:
    name: str  # the device kind a run reports (DTensorEngine.device_kind)
    device_name: str  # a regular expression found in torch.cuda.get_device_name's answer
    peak_bf16_tflops: float  # dense bf16 tensor-core peak per GPU: MFU's denominator


# The first whose pattern matches names the GPU: the longer names (GB200, H100 PCIe) come first.
CHIPS = {c.name: c for c in (
    Chip("a100", r"\bA100\b", 312.0),
    Chip("h100-pcie", r"\bH100 PCIe", 756.0),
    Chip("h100-nvl", r"\bH100 NVL", 835.0),
    Chip("h100", r"\bH100\b", 989.0),
    Chip("h200-nvl", r"\bH200 NVL", 835.0),
    Chip("h200", r"\bH200\b", 989.0),
    Chip("gb200", r"\bGB200\b", 2500.0),
    Chip("b200", r"\bB200\b", 2250.0),
    Chip("gb300", r"\bGB300\b", 2500.0),
    Chip("b300", r"\bB300\b", 2250.0),
    Chip("mi300x", r"\bMI300X\b", 1307.4),
    Chip("mi325x", r"\bMI325X\b", 1307.4),
    Chip("mi350x", r"\bMI350X\b", 2306.9),
    Chip("mi355x", r"\bMI355X\b", 2516.6),
)}


def chip(name: str) -> Chip | None:
    """The GPU kind called `name` ('h100'), None for anything else."""
    return CHIPS.get(name)


def chip_of_device(device_name: str) -> Chip | None:
    """The GPU kind of torch.cuda.get_device_name's answer ('NVIDIA H100 80GB HBM3' -> h100);
    None for a GPU without a row here, whose MFU is then n/a."""
    return next((c for c in CHIPS.values() if re.search(c.device_name, device_name)), None)


@dataclass(frozen=True)
class Accelerator:
    name: str
    gke_accelerator: str  # GKE's cloud.google.com/gke-accelerator label (helm/values.yaml repeats it)
    machine_type: str  # the usual GKE machine type of a multi-node training job
    gpus_per_node: int  # GPUs of that machine type: one pod per node, one torchrun process per GPU
    hbm_gb: float  # HBM per GPU, GB
    chip: str  # its GPU kind, a key of CHIPS


ACCELERATORS = {a.name: a for a in (
    Accelerator("h100-80gb", "nvidia-h100-80gb", "a3-highgpu-8g", 8, 80, "h100"),
    Accelerator("h100-mega-80gb", "nvidia-h100-mega-80gb", "a3-megagpu-8g", 8, 80, "h100"),
    Accelerator("h200-141gb", "nvidia-h200-141gb", "a3-ultragpu-8g", 8, 141, "h200"),
    Accelerator("b200", "nvidia-b200", "a4-highgpu-8g", 8, 180, "b200"),
    Accelerator("a100-80gb", "nvidia-a100-80gb", "a2-ultragpu-8g", 8, 80, "a100"),
    Accelerator("a100-40gb", "nvidia-tesla-a100", "a2-highgpu-8g", 8, 40, "a100"),
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
