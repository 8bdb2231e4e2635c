"""The model plan (clm.model.plan) is built once and read by everything at startup: the checks,
the memory pre-flight with its fallback search, the run log's FLOPs per token. None of them
builds transformers' model again or reads the pretrained directory's headers again."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_layout import write_hub_checkpoint  # noqa: E402

TINY = json.loads((REPO / "clm/model/configs/mixtral_tiny.json").read_text()) | {"vocab_size": 1024}


def single_file(hub: Path) -> Path:
    """The hub's other layout: one model.safetensors and no index."""
    (hub / "model.safetensors.index.json").unlink()
    (hub / "model-00001-of-00001.safetensors").rename(hub / "model.safetensors")
    return hub


@pytest.mark.xla  # the startup of an XLA run
@pytest.mark.parametrize("files", [3, 1])
def test_startup_builds_the_meta_model_once_and_reads_each_header_once(tmp_path, files):
    import safetensors
    from transformers import AutoModelForCausalLM

    from clm.config import load_config
    from clm.engine.xla import XlaEngine
    from clm.errors import UserError
    from clm.model.plan import ModelPlan
    from clm.observe.run_log import RunLog
    from clm.parallel import MeshShape
    from clm.plan import preflight

    hub = write_hub_checkpoint(tmp_path / "hub", TINY, num_files=files, tokenizer=False)
    if files == 1:
        single_file(hub)
    cfg = load_config([f"model.name_or_path={hub}", f"output_dir={tmp_path / 'out'}", "wandb.mode=disabled"],
                      num_devices=4)
    with mock.patch.object(AutoModelForCausalLM, "from_config", wraps=AutoModelForCausalLM.from_config) as built, \
            mock.patch.object(safetensors, "safe_open", wraps=safetensors.safe_open) as opened:
        model_plan = ModelPlan.from_config(cfg, MeshShape(1, 4, 1, 1))
        # Less than any setting needs: the search tries every fallback, on 4 devices and on 1.
        with pytest.raises(UserError, match="no smaller setting of this model fits"):
            preflight(model_plan, "CPU", "CPU", available_bytes=1e9)
        RunLog(cfg, {}, XlaEngine(), enabled=False).run_config(
            optimizer_defaults={"betas": (0.9, 0.999), "eps": 1e-8}, warmup_steps=0, eval_samples=1, model_plan=model_plan, num_devices=4)
    assert built.call_count == 1
    assert sorted(Path(call.args[0]).name for call in opened.call_args_list) == model_plan.checkpoint.files
