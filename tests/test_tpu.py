"""The one table of TPU generations (clm.tpu) and its readers: planner topologies, MFU, launcher types."""

import pytest

from clm import metrics, plan, tpu
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
