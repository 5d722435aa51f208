"""Qwen3 model: parity with transformers, KV cache, parameter count of the presets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from molgen.lm import convert
from molgen.lm.model import (
    Qwen3,
    Qwen3Config,
    attend,
    cache_mask,
    causal_attend,
    count_params,
    init_cache,
    linear,
    packed_mask,
    rope,
    rope_tables,
)

TINY = Qwen3Config(vocab_size=384, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=160)


def _init(cfg, b=2, t=16, seed=0):
    tok = jnp.zeros((b, t), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    return Qwen3(cfg).init(jax.random.key(seed), tok, pos, packed_mask(jnp.ones((b, t), jnp.int32)))["params"]


def test_logits_match_transformers_qwen3():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen3Config(**convert.config_to_hf(TINY), attn_implementation="eager")
    hf = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # random (not zero) norm scales so QK-norm and the norms are exercised
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    params = convert.hf_to_params(tensors, TINY)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, TINY.vocab_size, size=(2, 24))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    pos = jnp.broadcast_to(jnp.arange(24), (2, 24))
    ones = jnp.ones((2, 24), jnp.int32)
    for mask in (packed_mask(ones), ones):  # explicit mask, and segment ids (the training path, causal_attend)
        ours, _ = Qwen3(TINY).apply({"params": params}, jnp.asarray(tokens), pos, mask)
        np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-4)
    back = convert.params_to_hf(params, TINY)
    assert all(np.array_equal(back[k], tensors[k]) for k in back)


def test_kv_cache_decoding_equals_full_forward():
    params = _init(TINY)
    model = Qwen3(TINY)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, size=(2, 12)))
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    full, _ = model.apply({"params": params}, tokens, pos, packed_mask(jnp.ones((2, 12), jnp.int32)))
    cache = init_cache(TINY, 2, 16)
    logits, cache = model.apply({"params": params}, tokens[:, :5], pos[:, :5], cache_mask(pos[:, :5], 16), cache)
    steps = [logits]
    for t in range(5, 12):
        p = pos[:, t : t + 1]
        logits, cache = model.apply({"params": params}, tokens[:, t : t + 1], p, cache_mask(p, 16), cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_packed_segments_do_not_attend_across_molecules():
    params = _init(TINY)
    model = Qwen3(TINY)
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, TINY.vocab_size, 7), rng.integers(0, TINY.vocab_size, 9)
    packed = jnp.asarray(np.concatenate([a, b])[None])
    seg = jnp.asarray([[1] * 7 + [2] * 9])
    pos = jnp.asarray([list(range(7)) + list(range(9))])
    out, _ = model.apply({"params": params}, packed, pos, packed_mask(seg))
    alone, _ = model.apply(
        {"params": params}, jnp.asarray(b[None]), jnp.arange(9)[None], packed_mask(jnp.ones((1, 9), jnp.int32))
    )
    np.testing.assert_allclose(out[:, 7:], alone, atol=1e-5)


@pytest.mark.parametrize("block", [8, 32])
def test_blockwise_causal_attention_equals_masked_attention_with_gradients(block):
    """causal_attend (blocks above the diagonal skipped, flash backward) against attend under
    packed_mask: values and all three gradients, with three segments and padding (rows that see
    no key) in one row and a single segment in the other."""
    b, t, h, kv, d = 2, 32, 4, 2, 16
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) for n in (h, kv, kv))
    seg = jnp.asarray([[1] * 5 + [2] * 11 + [3] * 10 + [0] * 6, [1] * t])
    w = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)

    def masked(q, k, v):
        return attend(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), packed_mask(seg), jnp.float32)

    def blockwise(q, k, v):
        return causal_attend(q, k, v, seg, block)

    np.testing.assert_allclose(blockwise(q, k, v), masked(q, k, v), atol=1e-5)
    grads = [jax.grad(lambda *x, f=f: jnp.sum(f(*x) * w), (0, 1, 2))(q, k, v) for f in (masked, blockwise)]
    for g_ref, g in zip(*grads, strict=True):
        np.testing.assert_allclose(g, g_ref, atol=2e-5)
        assert float(jnp.max(jnp.abs(g_ref))) > 0.1


@pytest.mark.parametrize("k, n", [(8, 24), (24, 8)])
def test_linear_custom_vjp_equals_autodiff_of_dot(k, n):
    """`linear` transposes the smaller operand of dW explicitly (both branches): the gradients equal
    those of jnp.dot."""
    rng = np.random.default_rng(0)
    x, w, c = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, 5, k), (k, n), (2, 5, n)))
    grads = [jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) * c), (0, 1))(x, w) for f in (jnp.dot, linear)]
    np.testing.assert_allclose(linear(x, w), jnp.dot(x, w), atol=1e-6)
    for g_ref, g in zip(*grads, strict=True):
        np.testing.assert_allclose(g, g_ref, atol=1e-5)


def test_rope_is_the_rotate_half_rotation_and_its_gradient_the_inverse():
    """RoPE by a signed-permutation matmul equals the rotate-half formula (x1 cos - x2 sin,
    x2 cos + x1 sin) with angle p * theta^(-2i/D), and its vector-Jacobian product is the rotation
    by minus the angle (a rotation preserves norms)."""
    rng = np.random.default_rng(1)
    b, t, h, d = 2, 7, 3, 8
    x = rng.normal(size=(b, t, h, d)).astype(np.float32)
    pos = rng.uniform(0, 50, size=(b, t)).astype(np.float32)
    ang = pos[..., None, None] * 1e4 ** (-np.arange(0, d, 2) / d)  # [B, T, 1, D/2]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    ref = np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)
    tables = rope_tables(jnp.asarray(pos), d, 1e4)
    out = rope(jnp.asarray(x), tables)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    _, vjp = jax.vjp(lambda y: rope(y, tables), jnp.asarray(x))
    np.testing.assert_allclose(vjp(out)[0], x, atol=1e-5)  # R^T R x = x


def test_qwen3_06b_preset_has_596m_parameters():
    from configs import lm_models

    cfg = Qwen3Config.from_config(lm_models.get("qwen3_0.6b"))
    shapes = jax.eval_shape(lambda: _init(cfg, b=1, t=1))
    n = count_params(shapes)
    assert abs(n - 596e6) / 596e6 < 0.01, n


def test_aligned_positions_couple_skeleton_to_prompt_and_decode_incrementally():
    from molgen.chem import enriched
    from molgen.lm import tokenizer as T

    mol = enriched.embed_conformers("CC(=O)Nc1ccc(O)cc1", 1, seed=0)
    smiles, enr = enriched.encode(mol)
    ids = T.encode(enriched.unit_text(smiles, enr))
    pos = T.positions(ids, "aligned")
    vocab = T.vocab()
    prompt = [p for i, p in zip(ids, pos, strict=False) if p < T.ALIGN_OFFSET and vocab[i] not in T.SPECIALS]
    skeleton = [
        p for i, p in zip(ids, pos, strict=False) if p > T.ALIGN_OFFSET and p == int(p) and vocab[i] != T.CONF_END
    ]
    assert np.allclose(np.asarray(skeleton) - np.asarray(prompt), T.ALIGN_OFFSET - 1)
    # the jitted decoding recurrence reproduces the host-side positions token by token
    n_prompt = int(np.where(ids == T.CONF_ID)[0][0]) + 1
    _, state = T.positions_and_state(ids[:n_prompt], "aligned")
    last = jnp.float32(pos[n_prompt - 1])
    state = tuple(jnp.asarray(x) for x in state)
    for k in range(n_prompt, len(ids)):
        last, *state = T.next_position(last, *state, jnp.int32(ids[k]), "aligned")
        assert float(last) == pytest.approx(float(pos[k])), k


def test_sampling_with_aligned_positions_matches_full_forward_greedy():
    from molgen.lm import sample
    from molgen.lm import tokenizer as T

    cfg = Qwen3Config(vocab_size=T.vocab_size(), d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128)
    params = _init(cfg)
    prompts = [T.encode("[SMILES]CCO[/SMILES][CONFORMER]"), T.encode("[SMILES]c1ccccc1[/SMILES][CONFORMER]")]
    arr, lens, pos, state = sample.prepare_prompts(prompts, "aligned")
    out, n = sample.generate(
        params,
        jnp.asarray(arr),
        jnp.asarray(lens),
        jax.random.key(0),
        cfg=cfg,
        max_new=6,
        greedy=True,
        stop_id=-1,
        prompt_pos_BxP=jnp.asarray(pos),
        pos_state=tuple(jnp.asarray(x) for x in state),
        pos_mode="aligned",
    )
    for r in range(2):  # re-run the whole sequence without a cache: greedy tokens must agree
        seq = np.concatenate([prompts[r], np.asarray(out[r])])
        p = T.positions(seq, "aligned")
        logits, _ = Qwen3(cfg).apply(
            {"params": params},
            jnp.asarray(seq[None]),
            jnp.asarray(p[None]),
            packed_mask(jnp.ones((1, len(seq)), jnp.int32)),
        )
        greedy = np.argmax(np.asarray(logits[0]), -1)[len(prompts[r]) - 1 : -1]
        np.testing.assert_array_equal(greedy, np.asarray(out[r]))


def test_hf_checkpoint_folder_roundtrip_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    params = jax.device_get(_init(TINY))
    convert.save_hf_dir(params, TINY, str(tmp_path / "hf"))
    hf = transformers.Qwen3ForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    tokens = np.arange(10)[None] % TINY.vocab_size
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    ours, _ = Qwen3(TINY).apply(
        {"params": params}, jnp.asarray(tokens), jnp.arange(10)[None], packed_mask(jnp.ones((1, 10), jnp.int32))
    )
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-4)
    hf_cfg, tensors = convert.load_hf_dir(str(tmp_path / "hf"))
    back = convert.hf_to_params(tensors, convert.config_from_hf(hf_cfg))
    assert jax.tree.all(jax.tree.map(np.array_equal, back, params))
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert.load_hf_dir(str(tmp_path))


def test_molgen2hf_refuses_an_aligned_position_run_unless_allowed(tmp_path, capsys, root):
    """A run with the config.json molgen.main records for experiments/lm_tiny.py (data.positions
    "aligned") is refused by the real CLI, naming the run and the reason; --allow_position_mismatch
    converts it with a warning; a folder that records no position mode is converted with a note."""
    import json
    import subprocess
    import sys

    from experiments import lm_tiny

    params = jax.device_get(_init(TINY))
    convert.save_hf_dir(params, TINY, str(tmp_path / "hf"))
    run, out = tmp_path / "run", tmp_path / "out"
    convert.main(["hf2molgen", f"--src={tmp_path / 'hf'}", f"--dst={run}"])
    (run / "config.json").write_text(json.dumps(lm_tiny.get_config().to_dict(), default=str))
    cmd = [sys.executable, "-m", "molgen.lm.convert", "molgen2hf", f"--src={run}", f"--dst={out}"]
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and not out.exists()
    assert f"{run} was trained with data.positions='aligned'" in r.stderr
    assert "--allow_position_mismatch" in r.stderr and "Traceback" not in r.stderr
    convert.main(["molgen2hf", "--src", str(run), "--dst", str(out), "--allow_position_mismatch"])  # --flag value
    assert "warning:" in capsys.readouterr().err
    back = convert.hf_to_params(convert.load_hf_dir(str(out))[1], TINY)
    assert jax.tree.all(jax.tree.map(np.array_equal, back, params))
    (run / "config.json").unlink()  # as hf2molgen leaves it: no recorded positions; a step folder as the source
    convert.main(["molgen2hf", f"--src={run / 'checkpoints' / '0'}", f"--dst={tmp_path / 'out2'}"])
    assert "records no position mode" in capsys.readouterr().err and (tmp_path / "out2" / "model.safetensors").exists()


def test_grammar_constrained_sampling_writes_only_well_formed_coordinate_blocks():
    """A random model at T=1 writes broken blocks; with the grammar every block parses."""
    import re

    from molgen.lm import sample
    from molgen.lm import tokenizer as T

    for st in range(12):  # the jitted automaton step agrees with the host one
        for c in range(7):
            assert int(T.grammar_next(jnp.array([st]), jnp.array([int(np.argmax(T.grammar_classes() == c))]))[0]) == (
                T.grammar_next_host(st, c)
            )
    cfg = Qwen3Config(vocab_size=T.vocab_size(), d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128)
    params = _init(cfg, seed=3)
    prompts = [T.encode("[SMILES]CCO[/SMILES][CONFORMER][C]")] * 8
    arr, lens, pos, state = sample.prepare_prompts(prompts)
    block = re.compile(r"<-?\d+(\.\d{1,4})?,-?\d+(\.\d{1,4})?,-?\d+(\.\d{1,4})?>")
    for grammar in (True, False):
        out, _ = sample.generate(params, jnp.asarray(arr), jnp.asarray(lens), jax.random.key(1), cfg=cfg, max_new=200,
                                 stop_id=-1, grammar=grammar)  # fmt: skip
        texts = [T.decode(o) for o in np.asarray(out)]
        ok = [T.grammar_accepts(o) for o in np.asarray(out)]
        blocks = [b for t in texts for b in re.findall(r"<[^<>]*>", t)]
        if grammar:
            assert all(ok) and blocks and all(block.fullmatch(b) for b in blocks)
            assert all(t.count("<") - t.count(">") in (0, 1) for t in texts)  # at most the last block still open
        else:
            assert not all(ok)
    # a prompt that ends inside a block (a repair prefix): the automaton starts in its state
    prompt = np.concatenate([T.encode("[SMILES]CCO[/SMILES][CONFORMER][C]"), [T._index()[t] for t in ("<1", ",2")]])
    cut, st = T.grammar_violation(prompt)
    assert cut == -1 and st == 6  # two delimiters seen, no fraction yet
    ids = [T._index()[t] for t in ("[C]", "<1", ",2", "<3")]
    assert T.grammar_violation(ids)[0] == 3  # `<3` breaks the block
    ids = [T._index()[t] for t in ("[C]", "<1", ",2", ",3", ">", "[O]", "<1", ".5", ",2", ",3", ">", "[C]")]
    assert [T.grammar_step_end(ids, i) for i in (0, 1, 3, 5, 7, 11)] == [0, 4, 4, 5, 10, 11]
    arr, lens, pos, state = sample.prepare_prompts([prompt] * 8)
    out, _ = sample.generate(params, jnp.asarray(arr), jnp.asarray(lens), jax.random.key(2), cfg=cfg, max_new=200,
                             stop_id=-1, grammar=True, grammar_state_B=jnp.full((8,), st))  # fmt: skip
    for o in np.asarray(out):
        assert T.grammar_violation(np.concatenate([prompt, o]))[0] == -1
