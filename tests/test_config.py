"""Config composition, presets, the eval cadence, and every bad input's one-line error."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clm.config import eval_frequency_for, load_config
from clm.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_default_job_composes_with_the_reference_knobs():
    cfg = load_config([], num_devices=4)
    assert cfg.global_train_batch_size == cfg.per_device_train_batch_size * 4
    assert cfg.global_eval_batch_size == cfg.per_device_eval_batch_size * 4
    assert cfg.run_dir == os.path.join(cfg.output_dir, cfg.exp_name)
    assert cfg.sched.name == "WarmupHoldPolicy" and cfg.sched.max_steps == cfg.max_steps
    assert cfg.model.config_path == "mixtral_tiny.json"
    assert cfg.model.max_sequence_length == cfg.max_length
    assert Path(cfg.dataset.train_dataset_path).is_file()
    assert Path(cfg.dataset.eval_dataset_path).is_file()


def test_gbs256_preset_has_the_reference_values():
    cfg = load_config(["+experiment=gbs256_tpu"], num_devices=256)
    assert (cfg.global_train_batch_size, cfg.max_length, cfg.max_steps, cfg.eval_frequency) == (256, 32768, 250, 6)
    assert (cfg.lr, cfg.seed, cfg.weight_decay, cfg.max_grad_norm) == (2e-5, 4321, 0.1, 1.0)
    assert cfg.model.config_path == "mixtral822.json" and cfg.model.capacity_factor == 1.25
    assert cfg.model.dtype == "bfloat16" and cfg.model.fsdp_config.xla_fsdp_grad_ckpt
    assert cfg.sched.warmup_ratio == 0.25 and cfg.sched.hold_steps == 10_000_000_000_000
    assert cfg.dataset.dataset_name == "c4_mlperf" and cfg.target_eval_loss == 1.8


@pytest.mark.parametrize("preset", ["convergence_template", "dryrun_v4-8", "cpu"])
def test_other_presets_compose(preset):
    cfg = load_config([f"+experiment={preset}"], num_devices=8)
    assert cfg.dataset.dataset_name == "c4_mlperf"
    assert cfg.global_train_batch_size % 8 == 0


def test_plain_experiment_override_is_accepted_like_the_reference_plus_form():
    assert load_config(["experiment=dryrun_v4-8"], 4) == load_config(["+experiment=dryrun_v4-8"], 4)


def test_global_batch_can_be_set_instead_of_derived():
    assert load_config(["global_train_batch_size=32"], num_devices=4).global_train_batch_size == 32


@pytest.mark.parametrize(
    "max_length, gbs, expected",
    [(32768, 256, 6), (32768, 128, 12), (2048, 1024, 24), (4096, 100, 123)],
)
def test_eval_frequency_minus_one_is_the_reference_formula(max_length, gbs, expected):
    # ceil(24576 * 2048 / max_length / gbs), written out: 24576*2048 = 50331648 tokens.
    assert eval_frequency_for(max_length, gbs) == expected
    cfg = load_config([f"max_length={max_length}", f"global_train_batch_size={gbs}",
                       "eval_frequency=-1", "model.config_path=mixtral822.json"], num_devices=gbs)
    assert cfg.eval_frequency == expected


def test_device_count_is_not_needed_to_report_a_typo():
    def no_runtime():
        raise AssertionError("the device count was asked for before the keys were checked")

    with pytest.raises(UserError, match="max_step"):
        load_config(["max_step=3"], num_devices=no_runtime)


@pytest.mark.parametrize(
    "overrides, names",
    [
        (["+foo=1"], "foo"),
        (["foo=1"], "foo"),
        (["+model.foo=1"], "model.foo"),
        (["max_step=3"], "max_steps"),
        (["max_steps=abc"], "max_steps=abc"),
        (["lr=[1,2]"], "lr="),
        (["do_first_eval=maybe"], "do_first_eval"),
        (["global_train_batch_size=10"], "global_train_batch_size=10"),
        (["gradient_accumulation_steps=3"], "gradient_accumulation_steps"),
        (["sched=Nope"], "WarmupHoldPolicy"),
        (["sched.name=Nope"], "sched.name=Nope"),
        (["optimizer=Foo"], "optimizer=Foo"),
        (["dataset=nope"], "c4_mlperf"),
        (["+experiment=nope"], "gbs256_tpu"),
        (["model.dtype=int8"], "model.dtype"),
        (["sched=CosineAnnealing", "sched.min_lr=1"], "sched.min_lr"),
        (["output_dir=gs://bucket/runs"], "run_dir=gs://bucket/runs/moe_trial"),
    ],
)
def test_bad_config_is_one_user_error_naming_the_knob(overrides, names):
    with pytest.raises(UserError) as info:
        load_config(overrides, num_devices=4)
    message = str(info.value)
    assert names in message
    assert "\n" not in message


def run_cli(*overrides, cwd=REPO):
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4"}
    return subprocess.run([sys.executable, str(REPO / "run_clm.py"), *overrides],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.parametrize(
    "overrides, names",
    [
        (["+foo=1"], "foo"),
        (["max_steps=abc"], "max_steps"),
        (["global_train_batch_size=6"], "global_train_batch_size"),
        (["model.config_path=no_such_model.json"], "model.config_path=no_such_model.json"),
        (["max_length=8192"], "max_position_embeddings=4096"),
    ],
)
def test_cli_bad_input_is_one_line_nonzero_exit_no_traceback_and_keeps_old_files(tmp_path, overrides, names):
    run_dir = tmp_path / "moe_trial"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("sentinel: from a good run\n")
    result = run_cli(f"output_dir={tmp_path}", *overrides)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and names in error_lines[0], result.stderr
    assert (run_dir / "config.yaml").read_text() == "sentinel: from a good run\n"


@pytest.mark.parametrize(
    "text, message",
    [('{"model_type": "no_such_model", "hidden_size": 8}', "model_type 'no_such_model' is not an architecture"),
     ("{not json", "not valid JSON")],
)
def test_model_config_that_is_not_a_causal_lm_json_is_one_user_error(tmp_path, text, message):
    from clm.model.config import load_model_config

    (tmp_path / "model.json").write_text(text)
    with pytest.raises(UserError, match=message) as info:
        load_model_config(load_config([f"model.config_path={tmp_path / 'model.json'}"], num_devices=4))
    assert "\n" not in str(info.value)
