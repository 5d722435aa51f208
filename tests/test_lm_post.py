"""Post-training math: rewards, GRPO, k3 KL, DPO losses, dynamic beta (hand computations)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from molgen.lm import losses, rewards, tokenizer


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# --- rewards -----------------------------------------------------------------------------
def test_rewards_against_hand_computation():
    d = np.array([[0.5, 1.0], [2.0, 0.75]])
    delta, rho, sigma = 0.75, 0.07, 0.3
    k = [[sig((delta - d[i, j]) / rho) for j in range(2)] for i in range(2)]
    want_smcov = [
        0.5 * (k[0][0] * (1 - k[1][0]) + k[0][1] * (1 - k[1][1])),
        0.5 * (k[1][0] * (1 - k[0][0]) + k[1][1] * (1 - k[0][1])),
    ]
    np.testing.assert_allclose(rewards.soft_coverage(d, delta, rho), want_smcov, rtol=1e-12)
    np.testing.assert_allclose(rewards.r_qual(d, sigma), [math.exp(-0.5 / 0.3), math.exp(-0.75 / 0.3)], rtol=1e-12)
    # Hungarian: greedy would take (0,0) then (1,1) for 0.8667 + 0.0667; the optimum is (0,1) + (1,0)
    d2 = np.array([[0.1, 0.2], [0.15, 0.7]])
    np.testing.assert_allclose(rewards.hungarian_match(d2, 0.75), [1 - 0.2 / 0.75, 1 - 0.15 / 0.75], rtol=1e-12)
    np.testing.assert_allclose(rewards.hungarian_match(d, 0.75), [1 - 0.5 / 0.75, 0.0], rtol=1e-12)
    # a third rollout far away and an invalid fourth one
    d3 = np.vstack([d, [[3.0, 3.0]], [[0.1, 0.1]]])
    valid = np.array([True, True, True, False])
    cfg = dict(w_smcov=5.0, w_qual=2.0, w_match=1.0, delta=delta, rho=rho, sigma=sigma, floor=-1.0)
    out = rewards.combine(d3, valid, cfg)
    k3 = [sig((delta - 3.0) / rho)] * 2
    smcov0 = 0.5 * (k[0][0] * (1 - k[1][0]) * (1 - k3[0]) + k[0][1] * (1 - k[1][1]) * (1 - k3[1]))
    want0 = 5 * smcov0 + 2 * math.exp(-0.5 / 0.3) + (1 - 0.5 / 0.75)
    assert out["reward"][0] == pytest.approx(want0, rel=1e-9)
    assert out["reward"][3] == -1.0 and out["r_smcov"][3] == 0.0  # the invalid rollout covers nothing
    assert out["r_match"][2] == 0.0


def test_judge_group_gates_and_rmsd():
    from molgen.chem import enriched

    smiles = "CC(=O)Nc1ccc(O)cc1"
    mol = enriched.embed_conformers(smiles, 3, seed=0)
    refs = [enriched.encode(mol, c.GetId())[1] for c in mol.GetConformers()]
    can = enriched.canonical(smiles)
    good = enriched.unit_text(can, refs[0])
    other = enriched.unit_text(can, enriched.encode(enriched.embed_conformers("CCO", 1, seed=0))[1])
    texts = [good, good.replace("[/CONFORMER]", ""), other, enriched.prompt_text(can) + "[C]<1,2>[/CONFORMER]"]
    out = rewards.judge_group((can, refs, texts, dict(w_smcov=5.0, w_qual=1.0)))
    recs = out["records"]
    assert out["cov"]["cov_p"] == 1.0 and out["cov"]["cov_r"] >= 1 / 3
    assert [r["reason"] for r in recs] == ["valid", "tags", "graph", "decode"]
    assert recs[0]["min_rmsd"] == pytest.approx(0.0, abs=1e-3) and recs[0]["r_qual"] == pytest.approx(1.0, abs=1e-2)
    assert [r["reward"] for r in recs[1:]] == [-1.0, -1.0, -1.0]
    s = rewards.summarize(recs)
    assert s["validity"] == 0.25 and s["fail_tags"] == 0.25


# --- GRPO --------------------------------------------------------------------------------
def _grpo_case():
    # sequence 1 (A=+1): ratios 2, 0.5, 1; sequence 2 (A=-1): ratios 2, 0.5 and one padded token
    old = jnp.zeros((2, 3))
    logp = jnp.log(jnp.array([[2.0, 0.5, 1.0], [2.0, 0.5, 7.0]]))
    mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return logp, old, jnp.array([1.0, -1.0]), mask


@pytest.mark.parametrize(
    "loss_type,want",
    [("grpo", (-0.9 + 1.4) / 2), ("bnpo", 0.1 / 5), ("dr_grpo", 0.1 / (2 * 3)), ("dapo", 0.1 / 5)],
)
def test_grpo_loss_normalisations_with_clipping_both_ways(loss_type, want):
    # token losses, eps 0.2: A=+1: r=2 -> -min(2, 1.2) = -1.2; r=0.5 -> -0.5; r=1 -> -1  (sum -2.7)
    #                        A=-1: r=2 -> -min(-2, -1.2) = 2; r=0.5 -> -min(-0.5, -0.8) = 0.8  (sum 2.8)
    logp, old, adv, mask = _grpo_case()
    loss_sum, weight, stats = losses.grpo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2, loss_type=loss_type)
    assert float(loss_sum / weight) == pytest.approx(want, rel=1e-6)
    assert float(stats["clip_high"]) == pytest.approx(1 / 5) and float(stats["clip_low"]) == pytest.approx(1 / 5)


def test_grpo_sequence_ratio_and_kl():
    logp, old, adv, mask = _grpo_case()
    # sequence ratio: exp(mean log ratio) = exp((log2 + log0.5 + 0)/3) = 1 for row 1, 1 for row 2
    loss_sum, weight, stats = losses.grpo_loss(
        logp, old, adv, mask, eps_low=0.2, eps_high=0.2, loss_type="grpo", ratio_level="sequence"
    )
    assert float(loss_sum / weight) == pytest.approx((-1.0 + 1.0) / 2, abs=1e-6)
    assert float(stats["clip_frac"]) == 0.0
    # k3 KL by hand: logp = log .5, ref = log .25 -> d = log .5, exp(d) - d - 1 = .5 + log 2 - 1
    kl = losses.k3_kl(jnp.log(0.5), jnp.log(0.25))
    assert float(kl) == pytest.approx(0.5 + math.log(2) - 1, rel=1e-6)
    ref = jnp.full_like(logp, math.log(0.25))
    ls, w, st = losses.grpo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.5, ref_logp_BxT=ref)
    tok_kl = lambda x: 0.25 / x - math.log(0.25 / x) - 1  # noqa: E731
    want = ((-2.7 + 0.5 * (tok_kl(2) + tok_kl(0.5) + tok_kl(1))) / 3 + (2.8 + 0.5 * (tok_kl(2) + tok_kl(0.5))) / 2) / 2
    assert float(ls / w) == pytest.approx(want, rel=1e-6)


def test_group_advantages():
    r = np.array([[1.0, 2.0, 3.0, 6.0]])
    a = losses.group_advantages(r, scale=False)
    np.testing.assert_allclose(a, [[-2, -1, 0, 3]])
    std = math.sqrt((4 + 1 + 0 + 9) / 3)  # Bessel-corrected, as torch.std
    np.testing.assert_allclose(losses.group_advantages(r), [[x / (std + 1e-4) for x in (-2, -1, 0, 3)]], rtol=1e-6)


def test_group_advantages_zero_std_guard():
    """Chemeleon2's form: std with ddof 1 + 1e-4, and A = 0 where the group's std is below 1e-4."""
    a = losses.group_advantages([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0], [1.0, 1.0 + 1e-5, 1.0]], zero_std=1e-4)
    np.testing.assert_allclose(np.asarray(a), [[-1 / (1 + 1e-4), 0, 1 / (1 + 1e-4)], [0, 0, 0], [0, 0, 0]], rtol=1e-6)
    assert np.asarray(losses.group_advantages([[1.0, 1.0 + 1e-5, 1.0]]))[0, 1] > 0  # without the guard: scaled up


def test_grpo_one_step_is_the_policy_gradient():
    """With pi_old = pi (one optimisation step per batch) the ratio is 1 and the gradient of the
    GRPO loss is the policy gradient -mean_seq A mean_tok grad log pi."""
    from molgen.lm import sequences
    from molgen.lm.model import Qwen3, Qwen3Config

    cfg = Qwen3Config(vocab_size=128, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64)
    model = Qwen3(cfg)
    rows = [sequences.make_row([2, 7, 9], [11, 12, 13, 5], 10), sequences.make_row([2, 8], [14, 5], 10)]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    params = model.init(jax.random.key(0), batch["tokens"], batch["positions"], jnp.ones((2, 10, 10), bool))["params"]
    adv = jnp.array([0.7, -1.3])

    def grpo(p):
        lp, m = sequences.completion_logps(model, p, batch)
        ls, w, st = losses.grpo_loss(lp, jax.lax.stop_gradient(lp), adv, m, eps_low=5e-4, eps_high=1.2e-3)
        return ls / w, st

    def pg(p):
        lp, m = sequences.completion_logps(model, p, batch)
        return -jnp.mean(adv * (lp * m).sum(-1) / m.sum(-1))

    (val, st), g1 = jax.jit(jax.value_and_grad(grpo, has_aux=True))(params)
    g2 = jax.jit(jax.grad(pg))(params)
    assert float(st["ratio"]) == pytest.approx(1.0, abs=1e-7) and float(st["clip_frac"]) == 0.0
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g1)) > 1e-4  # a real gradient


# --- DPO ---------------------------------------------------------------------------------
def test_dpo_losses_against_hand_values():
    m = losses.dpo_margin(-1.0, -3.0, -2.0, -2.0)
    assert float(m) == 2.0
    assert float(losses.dpo_loss(m, 0.1, "sigmoid")) == pytest.approx(math.log(1 + math.exp(-0.2)), rel=1e-6)
    assert float(losses.dpo_loss(m, 0.1, "ipo")) == pytest.approx((2 - 1 / 0.2) ** 2, rel=1e-6)
    assert float(losses.dpo_loss(m, 0.1, "hinge")) == pytest.approx(0.8, rel=1e-6)
    eps = 0.1
    want = (-(1 - eps) * math.log(sig(0.2)) + eps * math.log(sig(-0.2))) / (1 - 2 * eps)
    assert float(losses.dpo_loss(m, 0.1, "robust", eps)) == pytest.approx(want, rel=1e-6)
    # RPO: alpha x the chosen side's mean token NLL (log-prob sum -6 over 3 tokens, alpha 0.5)
    assert float(losses.rpo_nll(-6.0, 3.0, 0.5)) == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="dpo.loss"):
        losses.dpo_loss(m, 0.1, "nope")


@pytest.mark.parametrize("normalize, want", [(False, (3 - 5) ** 2), (True, (1 - 5) ** 2)])
def test_ipo_summed_and_length_normalised_against_hand_values(monkeypatch, normalize, want):
    """One pair through dpo.dpo_loss_fn (reference log-probs precomputed as sums), per-token
    log-probs set by hand: chosen 2 tokens (-1, -2; reference sum -4), rejected 4 tokens
    (-1, -1, -2, -4; reference sum -6); -100 at the masked positions must not count.
    Summed: M = (-3 + 8) - (-4 + 6) = 3. Mean per token (TRL's ipo): M = (-1.5 + 2) - (-2 + 1.5) = 1.
    IPO with beta 0.1: (M - 1/(2 beta))^2 = (M - 5)^2."""
    import experiments.lm_dpo as exp
    from molgen.lm import dpo, sequences

    lp = {"c_": jnp.array([[-1.0, -2.0, -100.0, -100.0]]), "r_": jnp.array([[-1.0, -1.0, -2.0, -4.0]])}
    mask = {"c_": jnp.array([[1.0, 1.0, 0.0, 0.0]]), "r_": jnp.array([[1.0, 1.0, 1.0, 1.0]])}
    monkeypatch.setattr(sequences, "completion_logps", lambda model, params, batch, side: (lp[side], mask[side]))
    cfg = exp.get_config("tiny")
    cfg.dpo.update(dict(loss="ipo", ipo_normalize=normalize, rpo_alpha=0.0, beta=0.1))
    batch = {"ref_c_": jnp.array([-4.0]), "ref_r_": jnp.array([-6.0]), "pair_id": jnp.array([0])}
    loss, aux = dpo.dpo_loss_fn(None, cfg)(None, batch, None, {"beta": jnp.float32(0.1)})
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(aux["margin"]) == pytest.approx(1.0 if normalize else 3.0, rel=1e-6)
    cfg.dpo.loss = "sigmoid"  # the other losses keep summed log-probs whatever ipo_normalize says
    loss, _ = dpo.dpo_loss_fn(None, cfg)(None, batch, None, {"beta": jnp.float32(0.1)})
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-0.3)), rel=1e-6)


def test_risk_beta_scripted_margins():
    hp = dict(delta=0.5, lam=0.5, gamma=1.0, alpha=0.1, beta_min=0.0, beta_max=2.0, warmup=2)
    c = losses.RiskBeta(beta0=0.1, **hp)
    assert c.update([1, 2, 3, 4])["beta"] == 0.1 and c.tau is None  # warmup: margins buffered
    out = c.update([5, 6, 7, 8])
    assert c.tau == 4.5 and out["beta"] == 0.1  # tau0 = median of all 8 warmup margins
    out = c.update([0, 1, 10, 11])  # batch median 5.5 -> tau 5; p = 2/4 = delta -> u = 0
    assert out["tau"] == 5.0 and out["p_hat"] == 0.5 and out["u"] == 0.0 and out["beta"] == pytest.approx(0.1)
    out = c.update([6, 7, 8, 9])  # median 7.5 -> tau 6.25; p = 3/4; u = .25/sqrt(.25/4) = 1
    assert out["tau"] == 6.25 and out["u"] == pytest.approx(1.0)
    assert out["beta"] == pytest.approx(0.1 * math.exp(0.1 * math.tanh(1.0)), rel=1e-12)
    # state round trip (what a resumed run restores)
    d = c.state_dict()
    c2 = losses.RiskBeta(beta0=0.5, **hp)
    c2.load(d)
    assert c2.update([1, 2, 3, 4]) == c.update([1, 2, 3, 4])
    # clipping at beta_max
    c3 = losses.RiskBeta(beta0=1.99, delta=0.1, alpha=1.0, warmup=0)
    assert c3.update(np.arange(10.0))["beta"] == 2.0


def test_beta_dpo_select():
    gap = jnp.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
    kw = dict(beta0=0.1, a=0.6, drop=0.2, momentum=0.9, min_beta=1e-3)
    keep, beta, m0, s = losses.beta_dpo_select(gap, 0.0, 1.0, False, jax.random.key(0), **kw)
    assert int(keep.sum()) == 8 and float(m0) == 4.5 and float(s) == pytest.approx(float(np.std(np.arange(10.0))))
    assert float(beta) == pytest.approx(0.1 * (1 + 0.6 * (float(gap[keep].mean()) - 4.5)), rel=1e-6)
    keep, beta, m0, s = losses.beta_dpo_select(gap, 1.0, 2.0, True, jax.random.key(1), **kw)
    assert float(m0) == pytest.approx(0.9 * 1.0 + 0.1 * 4.5) and float(s) == pytest.approx(0.9 * 2 + 0.1 * 2.8722813)
    keep, beta, *_ = losses.beta_dpo_select(gap, 100.0, 1.0, True, jax.random.key(1), **kw)
    assert float(beta) == pytest.approx(1e-3)  # clamped


def test_dpo_trains_on_the_sampled_ids_not_a_re_encoding():
    """A completion that breaks a coordinate block re-encodes to other tokens than the sampled
    ones (here the sampled `.5` `20` becomes `.52` `0`); DPO must use the sampled ids."""
    from molgen.lm import dpo

    sampled = [tokenizer._index()[t] for t in ("[C]", "<1", ".5", "20", ",2", ",3", ">", "[/CONFORMER]")]
    text = tokenizer.decode(sampled)
    assert tokenizer.encode(text).tolist() != sampled
    pair = {"chosen": text, "rejected": text, "chosen_ids": sampled}
    assert dpo.sampled_ids(pair, "chosen", "molecular").tolist() == sampled
    assert dpo.sampled_ids(pair, "rejected", "molecular").tolist() == tokenizer.encode(text).tolist()
    with pytest.raises(ValueError, match="chosen_ids do not decode"):
        dpo.sampled_ids({**pair, "chosen_ids": sampled[:-1]}, "chosen", "molecular")
    with pytest.raises(ValueError, match="not a list of token ids"):
        dpo.sampled_ids({**pair, "chosen_ids": [-3]}, "chosen", "molecular")


# --- upstream runs -----------------------------------------------------------------------
def test_ensure_run_builds_once_and_other_processes_wait(tmp_path, monkeypatch):
    """Process 0 (the only one in a single-process run) builds a missing run once; a finished run
    is returned as is; any other process waits for process 0's done.json and never builds."""
    import subprocess
    import types

    from molgen.core import upstream as policy

    w, calls = tmp_path / "pre", []

    def build(cmd, check, env, code=0):
        calls.append((cmd, env))
        if not code:
            w.mkdir()
            (w / "done.json").write_text("{}")
        return subprocess.CompletedProcess(cmd, code)

    monkeypatch.setattr(policy.subprocess, "run", build)
    assert policy.ensure_run(str(w), "experiments/x.py", ("--config.a=1",)) == str(w)
    cmd, env = calls[0]
    assert cmd[1:] == ["-m", "molgen.main", "--config=experiments/x.py", f"--workdir={w}", "--config.a=1"]
    assert env is None  # single process: the build inherits the environment as before
    assert policy.ensure_run(str(w), "experiments/x.py") == str(w) and len(calls) == 1  # finished: not rebuilt
    monkeypatch.setattr(policy.subprocess, "run", lambda cmd, check, env: build(cmd, check, env, code=3))
    with pytest.raises(RuntimeError, match="exit 3"):
        policy.ensure_run(str(tmp_path / "bad"), "experiments/x.py")
    with pytest.raises(FileNotFoundError, match="no experiment"):
        policy.ensure_run(str(tmp_path / "bad"), "")
    # process 0 of two: the build runs as a process of its own (no launch variables)
    monkeypatch.setattr(policy.jax, "process_count", lambda: 2)
    monkeypatch.setenv("MOLGEN_COORDINATOR", "127.0.0.1:1234")
    w = tmp_path / "pre2"
    monkeypatch.setattr(policy.subprocess, "run", build)
    policy.ensure_run(str(w), "experiments/x.py")
    assert "MOLGEN_COORDINATOR" not in calls[-1][1] and "PATH" in calls[-1][1]
    # process 1 of two: waits (here done.json appears during the first sleep), then times out clearly
    monkeypatch.setattr(policy.jax, "process_index", lambda: 1)
    monkeypatch.setattr(policy.subprocess, "run", None)  # never called
    w = tmp_path / "pre3"
    w.mkdir()
    fake_time = types.SimpleNamespace(monotonic=policy.time.monotonic, sleep=lambda s: (w / "done.json").write_text(""))
    monkeypatch.setattr(policy, "time", fake_time)
    assert policy.ensure_run(str(w), "experiments/x.py") == str(w)
    fake_time.sleep = lambda s: None
    with pytest.raises(TimeoutError, match="waiting for process 0"):
        policy.ensure_run(str(tmp_path / "bad"), "experiments/x.py", wait_s=0.05)
