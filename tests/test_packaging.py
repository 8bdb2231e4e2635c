"""What `pip install` brings: the base install carries no torch_xla (the newest torch and the
DTensor engine), and each extra adds exactly its stack. Read from pyproject.toml and, where clm
is installed from this checkout (pip install -e), from the installed metadata that pip used."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS = {"xla": {"torch==2.9.0", "torch_xla==2.9.0"},
          "tpu": {"torch==2.9.0", "torch_xla[pallas,tpu]==2.9.0"},
          "torchtpu": {"torch-tpu==0.2.0"}}


def names(requirements) -> set[str]:
    return {Requirement(r).name.replace("-", "_").lower() for r in requirements}


def pinned(requirements) -> set[str]:
    return {str(Requirement(r)) for r in requirements}


def test_the_base_install_has_no_torch_xla_and_takes_the_newest_torch():
    base = [Requirement(r) for r in PROJECT["dependencies"]]
    assert "torch_xla" not in names(PROJECT["dependencies"]) and "torch_tpu" not in names(PROJECT["dependencies"])
    torch = [r for r in base if r.name == "torch"]
    # no upper bound: pip picks the newest; the floor admits [xla]'s 2.9.0 (resolved with the base)
    assert [str(r.specifier) for r in torch] == [">=2.9"]
    assert torch[0].specifier.contains("2.9.0") and torch[0].specifier.contains("2.15.0")


def test_the_extras_add_each_stack():
    extras = PROJECT["optional-dependencies"]
    assert {name: pinned(extras[name]) for name in EXTRAS} == EXTRAS
    assert set(extras) == set(EXTRAS) | {"test"}
    assert not names(extras["test"]) & {"torch", "torch_xla", "torch_tpu"}  # the tests run on either stack


def installed() -> bool:
    try:
        importlib.metadata.distribution("clm")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not installed(), reason="clm is not pip-installed")
def test_the_installed_metadata_says_the_same():
    """What pip resolved from: Requires-Dist, the base's without markers, each extra's behind `extra == ...`."""
    requires = [Requirement(r) for r in importlib.metadata.requires("clm")]
    base = {str(r) for r in requires if r.marker is None}
    assert base == pinned(PROJECT["dependencies"]), "clm's installed metadata is stale: pip install -e . again"
    assert "torch_xla" not in names(base)
    for extra, expected in EXTRAS.items():
        found = {str(Requirement(f"{r.name}{'[' + ','.join(sorted(r.extras)) + ']' if r.extras else ''}{r.specifier}"))
                 for r in requires if r.marker is not None and r.marker.evaluate({"extra": extra})}
        assert found == expected, extra
