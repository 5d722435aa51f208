"""Every experiment file loads, documents its command, and names a known family."""

import importlib
import pathlib

import pytest

from molgen import main

EXPERIMENTS = sorted(
    p.stem for p in (pathlib.Path(__file__).parents[1] / "experiments").glob("*.py") if p.stem != "__init__"
)
VARIANTS = {"lm_pretrain_moses": ["cpu", "cpu_long", "gpu_06b"], "cg_villin": ["quick", "medium", "full"]}
VARIANTS.update({n: ["quick", "full", "tiny"] for n in EXPERIMENTS if n.startswith("crystal_")})


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_loads_and_documents_its_command(name):
    mod = importlib.import_module(f"experiments.{name}")
    assert f"experiments/{name}.py" in mod.__doc__ and "molgen.main" in mod.__doc__
    for variant in VARIANTS.get(name, [None]):
        cfg = mod.get_config(variant) if variant else mod.get_config()
        assert cfg.family in main.FAMILIES
        assert cfg.train.batch_size > 0
        if cfg.family == "lm":
            assert cfg.data.positions in ("sequential", "aligned")
        if cfg.family == "cg":
            assert cfg.loss.gamma_u == 0 and cfg.stages.stage1.optim.name == "adabelief"


def test_unknown_variant_is_named():
    mod = importlib.import_module("experiments.lm_pretrain_moses")
    with pytest.raises(ValueError, match="gpu_7b"):
        mod.get_config("gpu_7b")
