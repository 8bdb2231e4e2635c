"""TPU generations: the one table of the chip facts that the runtime, the planner, the metrics
and the launcher use. Plain data, no torch_xla.

Values from Google Cloud's TPU system-architecture pages (cloud.google.com/tpu/docs/v4,
/v5e, /v5p, /v6e): peak bf16 per chip v4 275, v5e 197, v5p 459, v6e 918 TFLOP/s; HBM per
chip 32, 16, 95, 32 GB; two TensorCores per chip on v4 and v5p (whose accelerator-type
names count TensorCores: v5p-256 is 128 chips), one on v5e and v6e (names count chips).
A physical v5e/v6e host holds 8 chips, but multi-host slices run 4-chip VMs
(ct5lp-hightpu-4t, ct6e-standard-4t), as v4 and v5p do: one process per 4 chips.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Generation:
    name: str
    peak_bf16_tflops: float  # dense bf16 matmul peak per chip: MFU's denominator
    hbm_gb: float  # HBM per chip, GB
    chips_per_host: int  # chips per TPU VM of a multi-host slice: one pod, one process
    cores_per_chip: int  # TensorCores per chip as the accelerator-type name counts them
    gke_accelerator: str  # GKE's cloud.google.com/gke-tpu-accelerator label (helm/values.yaml)


GENERATIONS = {g.name: g for g in (
    Generation("v4", 275.0, 32, 4, 2, "tpu-v4-podslice"),
    Generation("v5e", 197.0, 16, 4, 1, "tpu-v5-lite-podslice"),
    Generation("v5p", 459.0, 95, 4, 2, "tpu-v5p-slice"),
    Generation("v6e", 918.0, 32, 4, 1, "tpu-v6e-slice"),
)}
# Other spellings of a generation: the TPU API's and xpk's accelerator types (v5litepod-256
# is a v5e), which is also what the TPU runtime reports as the type.
ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}


def canonical(name: str) -> str:
    """'v5e' for 'v5litepod'; any other name unchanged."""
    return ALIASES.get(name, name)


def generation(name: str) -> Generation | None:
    """The generation called `name` (or an alias of it), None for unknown hardware such as a CPU."""
    return GENERATIONS.get(canonical(name))


def parse_accelerator_type(text: str) -> tuple[Generation, int] | None:
    """(generation, chips) of an accelerator type such as 'v5p-256' (128 chips) or
    'v5litepod-16' (16 chips); None if `text` is not one."""
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text)
    found = generation(match.group(1)) if match else None
    if found is None:
        return None
    return found, int(match.group(2)) // found.cores_per_chip


def names() -> str:
    return ", ".join(GENERATIONS)


# PCI ids of TPU chips (Google's vendor id; the device ids torch_xla's runtime recognises), so
# that whether a host has TPUs is known without importing torch_xla (clm.engine.backend).
GOOGLE_PCI_VENDOR = "0x1ae0"
TPU_PCI_DEVICES = ("0x0027", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076", "0x0056")


def chips_attached() -> int:
    """TPU chips on this host's PCI bus (0 anywhere else). Google's vendor id alone is not
    enough: a GCE VM's gVNIC network card carries it too."""
    import glob
    from pathlib import Path

    count = 0
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        device = Path(vendor).with_name("device")
        if Path(vendor).read_text().strip() == GOOGLE_PCI_VENDOR and device.read_text().strip() in TPU_PCI_DEVICES:
            count += 1
    return count
