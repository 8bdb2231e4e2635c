"""The tables of TPU generations (clm.tpu) and GPU kinds (clm.gpu) and their readers: planner topologies, MFU,
launcher types."""

import pytest

from clm import gpu, metrics, plan, tpu
from clm.errors import UserError
from clm.launch import job


def test_peak_bf16_and_hbm_are_googles_published_figures():
    # docs/design.md "MFU" and cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}
    assert {n: g.peak_bf16_tflops for n, g in tpu.GENERATIONS.items()} == {"v4": 275, "v5e": 197, "v5p": 459, "v6e": 918}
    assert {n: g.hbm_gb for n, g in tpu.GENERATIONS.items()} == {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}


@pytest.mark.parametrize("text, generation, chips", [
    ("v4-8", "v4", 4), ("v5p-256", "v5p", 128), ("v5litepod-16", "v5e", 16), ("v5e-256", "v5e", 256),
    ("v6e-8", "v6e", 8), ("v6litepod-64", "v6e", 64),
])
def test_accelerator_types_count_cores_on_v4_and_v5p_and_chips_elsewhere(text, generation, chips):
    parsed = tpu.parse_accelerator_type(text)
    assert (parsed[0].name, parsed[1]) == (generation, chips)
    topology = plan.parse_topology(f"2x{text}")
    assert (topology.kind, topology.chips, topology.hbm_gb) == (generation, 2 * chips, tpu.GENERATIONS[generation].hbm_gb)
    assert job.tpu_generation(text) == generation


@pytest.mark.parametrize("text", ["v9z-8", "v5p", "h100-8", "tpu-v5p-slice"])
def test_unknown_types_are_refused_by_every_reader(text):
    assert tpu.parse_accelerator_type(text) is None
    with pytest.raises(UserError, match="v5p-256"):
        plan.parse_topology(text)
    with pytest.raises(UserError, match="v5p-512"):
        job.tpu_generation(text)


def test_mfu_divides_by_the_tables_peak_and_knows_nothing_of_a_cpu():
    # 1e12 FLOPs per token at 459 tokens/s on one v5p chip is 100% MFU; the alias reads the same row
    assert metrics.mfu(1e12, 459.0, 1, "v5p") == pytest.approx(1.0)
    assert metrics.mfu(1e12, 197.0, 2, "v5litepod") == pytest.approx(0.5)
    assert metrics.mfu(1e12, 459.0, 1, "CPU") is None
    assert metrics.mfu(1e12, 989.0, 1, "h100") == pytest.approx(1.0)  # a GPU kind of clm.gpu
    assert metrics.mfu(1e12, 989.0, 1, "CUDA") is None  # a GPU clm.gpu has no row for


@pytest.mark.parametrize("device_name, kind", [
    # torch.cuda.get_device_name's answers (nvidia-smi's names; ROCm's product names)
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA H200", "h200"), ("NVIDIA H200 NVL", "h200-nvl"), ("NVIDIA B200", "b200"), ("NVIDIA GB200", "gb200"),
    ("NVIDIA B300 SXM6 AC", "b300"), ("NVIDIA GB300", "gb300"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA A100 80GB PCIe", "a100"), ("AMD Instinct MI300X", "mi300x"), ("AMD Instinct MI355X", "mi355x"),
    ("NVIDIA L4", None), ("Tesla T4", None),
])
def test_gpu_device_names_map_to_their_kind_and_unknown_ones_to_none(device_name, kind):
    found = gpu.chip_of_device(device_name)
    assert (found.name if found else None) == kind


def test_gpu_peaks_are_the_datasheets_dense_bf16_and_every_machine_type_names_a_known_chip():
    # clm/gpu.py's sources: the sparse figures halved (NVIDIA), AMD's dense peak bfloat16
    assert {n: c.peak_bf16_tflops for n, c in gpu.CHIPS.items()} == {
        "a100": 312, "h100-pcie": 756, "h100-nvl": 835, "h100": 989, "h200-nvl": 835, "h200": 989, "gb200": 2500,
        "b200": 2250, "gb300": 2500, "b300": 2250, "mi300x": 1307.4, "mi325x": 1307.4, "mi350x": 2306.9,
        "mi355x": 2516.6}
    assert all(gpu.chip(a.chip) for a in gpu.ACCELERATORS.values())
