"""Config groups shared by the LM post-training experiments (SFT, rollouts, GRPO, DPO)."""

import ml_collections

import experiments.lm_quickstart as quickstart

QUICKSTART = ("runs/lm_quickstart", "experiments/lm_quickstart.py")
TINY_PROMPTS = dict(n_train=12, n_val=2, n_test=3, conformers=2, test_conformers=2)  # tests: seconds to build


def policy(workdir: str = QUICKSTART[0], build_config: str = QUICKSTART[1]) -> ml_collections.ConfigDict:
    """The run to start from, and the experiment that builds it when it has not finished."""
    return ml_collections.ConfigDict(dict(workdir=workdir, build_config=build_config))


def prompts_data(**kw) -> ml_collections.ConfigDict:
    """MOSES prompts with reference conformers: train molecules (4 RDKit conformers each) for
    GRPO/rollouts and the quickstart's 100 test molecules (5 conformers) as held-out prompts."""
    d = quickstart.get_config().data.to_dict()
    d.update(n_train=1000, n_val=8, n_test=100, conformers=4, test_conformers=5)
    d.update(kw)
    return ml_collections.ConfigDict(d)


def rewards(**kw) -> ml_collections.ConfigDict:
    """Reward v3 (REFERENCE.md): smcov 5, qual 0, match 0; delta 0.75, rho 0.07, sigma 0.3."""
    d = dict(w_smcov=5.0, w_qual=0.0, w_match=0.0, delta=0.75, rho=0.07, sigma=0.3, floor=-1.0)
    d.update(kw)
    return ml_collections.ConfigDict(d)


def sampling(**kw) -> ml_collections.ConfigDict:
    d = dict(max_new_tokens=400, batch_size=64, temperature=1.0, top_k=0, top_p=1.0, grammar=False)
    d.update(kw)
    return ml_collections.ConfigDict(d)


def heldout_eval(**kw) -> ml_collections.ConfigDict:
    """Held-out reward/validity/COV-MAT: `num_molecules` test molecules, samples_per_ref x 5 each."""
    d = dict(num_molecules=100, samples_per_ref=2, max_new_tokens=400, batch_size=100, temperature=1.0, top_k=0,
             top_p=1.0, grammar=False, seed=0, mat_cap=3.0)  # fmt: skip
    d.update(kw)
    return ml_collections.ConfigDict(d)
