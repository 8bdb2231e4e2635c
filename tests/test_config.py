"""Config composition, presets, the eval cadence, and every bad input's one-line error."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clm.config import config_groups, eval_frequency_for, load_config
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
        (["backend=jax"], "backend=jax: use one of auto, xla, dtensor"),
    ],
)
def test_bad_config_is_one_user_error_naming_the_knob(overrides, names):
    with pytest.raises(UserError) as info:
        load_config(overrides, num_devices=4)
    message = str(info.value)
    assert names in message
    assert "\n" not in message


@pytest.mark.parametrize("tpu_chips, cuda, present, loading, expected", [
    (4, False, {"torch_xla"}, {"torch_xla"}, "xla"),
    (4, False, {"torch_xla", "torch_tpu"}, set(), "dtensor"),  # TorchTPU's torch: torch_xla 2.9 cannot load beside it
    (4, False, {"torch_tpu"}, set(), "dtensor"),  # TorchTPU
    (0, True, {"torch_xla"}, {"torch_xla"}, "dtensor"),
    (0, False, {"torch_xla"}, {"torch_xla"}, "xla"),  # XLA's CPU backend with virtual devices
    (0, False, set(), set(), "dtensor"),  # the current stack's CPU: gloo
])
def test_backend_auto_picks_the_engine_for_the_host(tpu_chips, cuda, present, loading, expected):
    from clm.engine import backend

    assert backend.auto(tpu_chips, cuda, present.__contains__, loading.__contains__) == expected


def test_backend_auto_on_a_tpu_host_without_torch_xla_or_torchtpu_is_one_line():
    from clm.engine import backend

    with pytest.raises(UserError, match=r"^backend=auto: this host has 4 TPU chips but neither torch_xla nor "
                                        r"torch_tpu loads; pip install -e '.\[tpu\]'.*'.\[torchtpu\]'"):
        backend.auto(4, False, lambda name: False, lambda name: False)


def test_backend_auto_reads_this_stack():
    """The real checks on this CPU host: torch_xla loads on the [xla] stack and is absent on the
    current one (torch_tpu on neither: it needs a TPU), and auto resolves accordingly."""
    import importlib.util

    from clm.engine import backend

    has_torch_xla = importlib.util.find_spec("torch_xla") is not None
    assert backend.is_installed("torch_xla") is backend.loads("torch_xla") is has_torch_xla
    assert backend.is_installed("torch_tpu") is backend.loads("torch_tpu") is False
    assert backend.is_installed("torch") is backend.loads("torch") is True
    assert backend.resolve("auto") == ("xla" if has_torch_xla else "dtensor")
    assert backend.resolve("dtensor") == "dtensor" and backend.resolve("xla") == "xla"


def test_the_resolved_backend_is_what_the_config_holds_and_what_the_device_count_is_asked_for():
    import importlib.util

    asked = []
    cfg = load_config(["backend=dtensor"], num_devices=lambda engine: asked.append(engine) or 4)
    assert cfg.backend == "dtensor" and asked == ["dtensor"]
    auto = "xla" if importlib.util.find_spec("torch_xla") else "dtensor"  # no GPU here
    assert load_config([], num_devices=4).backend == auto


def run_cli(*overrides, cwd=REPO):
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4"}
    return subprocess.run([sys.executable, str(REPO / "run_clm.py"), *overrides],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, names",
    [
        (["+foo=1"], "foo"),
        (["max_steps=abc"], "max_steps"),
        pytest.param(["global_train_batch_size=6"], "global_train_batch_size", marks=pytest.mark.xla),  # 4 devices
        (["model.config_path=no_such_model.json"], "model.config_path=no_such_model.json"),
        (["max_length=8192"], "max_position_embeddings=4096"),
        pytest.param(["model.compute_dtype=bfloat16"], "model.compute_dtype=bfloat16: not built yet on backend=xla",
                     marks=pytest.mark.xla),
        pytest.param(["compile=true"], "compile=true: backend=xla always compiles", marks=pytest.mark.xla),
        (["compile=true", "compile_backend=tvm"], "compile_backend=tvm: use one of inductor, aot_eager"),
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


# ------------------------------------------- the schema is the one source of knobs
#
# Adding a knob: a field in the schema (clm/config.py), its default with a comment in
# clm/conf/config.yaml or the group files, a row in README.md's knob table, and a decision
# whether a resumed run may change it (MAY_CHANGE_ON_RESUME in clm/checkpoint.py). These tests
# fail, saying which of them is missing, until all agree.

GROUP_KNOBS = ("model", "sched", "dataset", "sharding")  # config groups that are knobs (experiment is presets)


def schema_knobs(cls=None, prefix: str = "") -> list[str]:
    """Every leaf of the schema: `model.fsdp_config.xla_fsdp_grad_ckpt`, ...; `sharding` is one knob."""
    import dataclasses
    from typing import get_type_hints

    from clm.config import Config

    cls = cls or Config
    knobs = []
    for name, typ in get_type_hints(cls).items():
        knobs += schema_knobs(typ, f"{prefix}{name}.") if dataclasses.is_dataclass(typ) else [prefix + name]
    return knobs


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and f"{prefix}{key}" != "sharding":
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def composed(overrides: list[str] = ()) -> dict:
    """The default job's knobs as written (interpolations unresolved), schema defaults included."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from clm.config import Config

    with initialize_config_module("clm.conf", version_base=None):
        cfg = compose("config", overrides=list(overrides))
    merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    return flatten(OmegaConf.to_container(merged, resolve=False))


def group_choices() -> dict[str, str]:
    """config.yaml's defaults list: {group: option}."""
    from omegaconf import OmegaConf

    entries = OmegaConf.to_container(OmegaConf.load(REPO / "clm/conf/config.yaml"))["defaults"]
    return {k: v for entry in entries if isinstance(entry, dict) for k, v in entry.items()}


def may_change_on_resume(knob: str) -> bool:
    from clm.checkpoint import MAY_CHANGE_ON_RESUME

    return any(knob == k or knob.startswith(k + ".") for k in MAY_CHANGE_ON_RESUME)


def test_config_yaml_gives_every_schema_knob_a_default_and_no_other_key():
    defaults = composed()
    knobs = schema_knobs()
    no_default = [k for k in knobs if defaults.get(k) == "???"]
    assert not no_default, (
        f"{', '.join(no_default)}: in the schema (clm/config.py) but without a default; add it, with a comment "
        "saying what it does, to clm/conf/config.yaml (or the group file its section comes from)")
    unknown = sorted(set(defaults) - set(knobs))
    assert not unknown, f"{', '.join(unknown)}: in clm/conf but not in the schema; add a typed field to clm/config.py"


@pytest.mark.parametrize("group, option", [(g, o) for g, options in config_groups().items() if g in GROUP_KNOBS
                                           for o in options])
def test_every_group_option_sets_only_schema_knobs_and_leaves_none_without_a_value(group, option):
    load_config([f"{group}={option}"], num_devices=8)  # an unknown or mistyped key is a UserError
    no_value = [k for k, v in composed([f"{group}={option}"]).items() if v == "???" and k.startswith(group + ".")]
    assert not no_value, f"clm/conf/{group}/{option}.yaml leaves {', '.join(no_value)} without a value"


def readme_knob_table() -> dict[str, dict[str, str]]:
    import re

    text = (REPO / "README.md").read_text()
    header = "| knob | default | on resume | meaning |"
    assert header in text, f"README.md has no knob table; it starts with the line '{header}'"
    rows = {}
    for line in text.split(header, 1)[1].splitlines()[2:]:
        if not line.startswith("|"):
            break
        knob, default, resume, meaning = [cell.strip() for cell in line.strip("|").split("|", 3)]
        rows[knob.strip("`")] = {"default": re.sub(r"^`(.*)`$", r"\1", default), "resume": resume,
                                 "meaning": meaning.strip(" |")}
    return rows


def readme_row(knob: str, default) -> str:
    from omegaconf import OmegaConf

    shown = OmegaConf.to_yaml({"v": default}).strip()[3:] if not isinstance(default, str) else default
    resume = "may change" if may_change_on_resume(knob) else ""
    return f"| `{knob}` | `{shown}` | {resume} | ONE LINE OF MEANING |"


def test_readme_knob_table_lists_every_knob_with_its_default():
    from omegaconf import OmegaConf

    table = readme_knob_table()
    defaults, choices = composed(), group_choices()
    expected = {k: defaults[k] for k in schema_knobs() if k != "sharding"} | {g: choices[g] for g in GROUP_KNOBS}
    missing = [knob for knob in expected if knob not in table]
    assert not missing, "README.md's knob table lacks rows; add (in the section's order):\n" + "\n".join(
        readme_row(knob, expected[knob]) for knob in missing)
    extra = sorted(set(table) - set(expected))
    assert not extra, f"README.md's knob table has rows for {', '.join(extra)}, which the schema does not have"
    for knob, row in table.items():
        shown = OmegaConf.to_container(OmegaConf.create("v: " + row["default"]), resolve=False)["v"]
        assert shown == expected[knob], (f"README.md's knob table says {knob} defaults to {row['default']}; "
                                         f"the config says {expected[knob]!r}")
        assert row["resume"] == ("may change" if may_change_on_resume(knob) else ""), (
            f"README.md's knob table: {knob}'s 'on resume' cell must agree with MAY_CHANGE_ON_RESUME (clm/checkpoint.py)")
        assert row["meaning"], f"README.md's knob table: {knob} needs one line of meaning"


def test_may_change_on_resume_names_only_knobs():
    from clm.checkpoint import MAY_CHANGE_ON_RESUME

    knobs = schema_knobs()
    unknown = [k for k in MAY_CHANGE_ON_RESUME if not any(knob == k or knob.startswith(k + ".") for knob in knobs)]
    assert not unknown, f"MAY_CHANGE_ON_RESUME (clm/checkpoint.py) names {', '.join(unknown)}, no knob of the schema"


@pytest.mark.parametrize("preset", config_groups()["experiment"])
def test_presets_state_only_what_differs_from_the_defaults(preset):
    from omegaconf import OmegaConf

    path = REPO / "clm/conf/experiment" / f"{preset}.yaml"
    body = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    overrides = []
    for entry in body.pop("defaults", []):
        (key, option), = entry.items()
        group = key.removeprefix("override").strip().lstrip("/")
        assert group_choices().get(group) != option, f"{path.name}: `{key}: {option}` is already the default; delete it"
        overrides.append(f"{group}={option}")
    base = composed(overrides)
    restated = [f"{key}: {value}" for key, value in flatten(body).items() if base.get(key) == value]
    assert not restated, f"{path.name} restates defaults; delete: {'; '.join(restated)}"
