"""Hugging Face Qwen3 checkpoints (local folder, safetensors) <-> molgen parameters.

    python -m molgen.lm.convert hf2molgen --src=/path/Qwen3-0.6B --dst=runs/qwen3_init
    python -m molgen.lm.convert molgen2hf --src=runs/x --dst=/path/export [--allow_position_mismatch]

`hf2molgen` writes an Orbax checkpoint that `config.ckpt.init_from` accepts, plus the
model config as JSON. Decision: released Qwen3 weights use Qwen3's BPE vocabulary
(151936), not molgen's chemistry tokenizer; the converter copies embeddings as they
are, so a user starting from released weights sets `model.vocab_size` to match.
`molgen2hf` refuses a run trained with aligned positions (`data.positions`): Hugging Face
uses sequential positions, under which such a model does not sample correctly.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

import numpy as np
from absl import app, flags

from molgen.core import cli
from molgen.lm.model import Qwen3Config

_LAYER = {  # hf suffix -> (molgen path, transpose)
    "self_attn.q_proj.weight": (("attn", "q_proj", "kernel"), True),
    "self_attn.k_proj.weight": (("attn", "k_proj", "kernel"), True),
    "self_attn.v_proj.weight": (("attn", "v_proj", "kernel"), True),
    "self_attn.o_proj.weight": (("attn", "o_proj", "kernel"), True),
    "self_attn.q_norm.weight": (("attn", "q_norm", "scale"), False),
    "self_attn.k_norm.weight": (("attn", "k_norm", "scale"), False),
    "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), True),
    "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), True),
    "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), True),
    "input_layernorm.weight": (("input_norm", "scale"), False),
    "post_attention_layernorm.weight": (("post_attn_norm", "scale"), False),
}


def config_from_hf(hf: dict, **overrides) -> Qwen3Config:
    if not hf.get("tie_word_embeddings", True):
        raise ValueError("molgen's Qwen3 ties input and output embeddings; this checkpoint does not")
    kw = dict(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf["num_key_value_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        d_ff=hf["intermediate_size"],
        rope_theta=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 1e6))),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
    )
    kw.update(overrides)
    return Qwen3Config(**kw)


def config_to_hf(cfg: Qwen3Config) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "attention_bias": False,
        "max_position_embeddings": 40960,
        "torch_dtype": "float32",
    }


def hf_to_params(tensors: dict[str, np.ndarray], cfg: Qwen3Config) -> dict:
    """A flat HF state dict (name -> array) to the molgen parameter tree (float32)."""

    def take(name):
        if name not in tensors:
            raise KeyError(f"tensor {name!r} missing from the Hugging Face checkpoint")
        return np.asarray(tensors[name], np.float32)

    params = {
        "embed": {"embedding": take("model.embed_tokens.weight")},
        "final_norm": {"scale": take("model.norm.weight")},
    }
    for i in range(cfg.n_layers):
        layer: dict = {}
        for suffix, (path, transpose) in _LAYER.items():
            w = take(f"model.layers.{i}.{suffix}")
            node = layer
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = w.T if transpose else w
        params[f"layers_{i}"] = layer
    return params


def params_to_hf(params, cfg: Qwen3Config) -> dict[str, np.ndarray]:
    out = {
        "model.embed_tokens.weight": np.asarray(params["embed"]["embedding"]),
        "model.norm.weight": np.asarray(params["final_norm"]["scale"]),
    }
    for i in range(cfg.n_layers):
        for suffix, (path, transpose) in _LAYER.items():
            w = params[f"layers_{i}"]
            for key in path:
                w = w[key]
            w = np.asarray(w)
            out[f"model.layers.{i}.{suffix}"] = np.ascontiguousarray(w.T if transpose else w)
    return out


def load_hf_dir(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json dict, tensors) from a local HF folder with one or several safetensors files."""
    from safetensors.numpy import load_file

    root = pathlib.Path(path)
    cfg_file = root / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} not found: expected a Hugging Face checkpoint folder")
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {root}")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return json.loads(cfg_file.read_text()), tensors


def save_hf_dir(params, cfg: Qwen3Config, path: str) -> None:
    from safetensors.numpy import save_file

    root = pathlib.Path(path)
    root.mkdir(parents=True, exist_ok=True)
    save_file(params_to_hf(params, cfg), str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))


def hf2molgen(src: str, dst: str) -> pathlib.Path:
    """A local Hugging Face Qwen3 folder -> an Orbax checkpoint (`dst/checkpoints/0`) and `model_config.json`."""
    import orbax.checkpoint as ocp

    dst = pathlib.Path(dst).absolute()
    hf_cfg, tensors = load_hf_dir(src)
    cfg = config_from_hf(hf_cfg)
    with ocp.StandardCheckpointer() as ck:
        ck.save(dst / "checkpoints" / "0" / "state", {"params": hf_to_params(tensors, cfg)})
    (dst / "model_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    return dst


def recorded_positions(run: pathlib.Path) -> str | None:
    """The RoPE position mode a molgen LM run trained with: `policy.json` (post-training runs), else
    `config.json`'s data.positions; None when the run records neither (e.g. an hf2molgen folder)."""
    if (run / "policy.json").exists():
        return json.loads((run / "policy.json").read_text()).get("positions")
    if (run / "config.json").exists():
        return json.loads((run / "config.json").read_text()).get("data", {}).get("positions")
    return None


def molgen2hf(src: str, dst: str, allow_position_mismatch: bool = False) -> pathlib.Path:
    """A molgen LM run (workdir, or one of its checkpoint folders) -> a Hugging Face folder.

    Hugging Face runs Qwen3 with sequential positions 0..n-1; a run trained with other positions
    (data.positions="aligned") would not sample there as it does in molgen, so it is refused
    (ValueError) unless `allow_position_mismatch`, which converts with a warning."""
    import jax

    from molgen.core import checkpoint
    from molgen.lm.model import Qwen3

    p = pathlib.Path(src).absolute()
    run = next((d for d in (p, *list(p.parents)[:2]) if (d / "model_config.json").exists()), None)
    if run is None:
        raise FileNotFoundError(f"{p / 'model_config.json'} not found: {src!r} is not a molgen LM run")
    mode = recorded_positions(run)
    if mode is None:
        print(
            f"note: {run} records no position mode (no policy.json, no data.positions in config.json); "
            "converting it as a sequential-position model",
            file=sys.stderr,
        )
    elif mode != "sequential":
        why = (
            f"{run} was trained with data.positions={mode!r}, but Hugging Face uses sequential positions, "
            "under which this model does not sample correctly"
        )
        if not allow_position_mismatch:
            raise ValueError(f"refusing to convert: {why}; pass --allow_position_mismatch to convert anyway")
        print(f"warning: {why}; converting anyway (--allow_position_mismatch)", file=sys.stderr)
    cfg = Qwen3Config(**json.loads((run / "model_config.json").read_text()))
    tok = jax.numpy.zeros((1, 1), jax.numpy.int32)
    mask = jax.numpy.ones((1, 1, 1), bool)
    abstract = jax.eval_shape(lambda: Qwen3(cfg).init(jax.random.key(0), tok, tok, mask))["params"]
    dst = pathlib.Path(dst).absolute()
    save_hf_dir(checkpoint.restore_params(str(p), abstract), cfg, str(dst))
    return dst


def _flags(fv):
    """This CLI's flags, defined on `fv` when it runs (not at import: molgen.main and others define flags)."""
    flags.DEFINE_string("src", None, "HF folder (hf2molgen) or molgen run (molgen2hf)", required=True, flag_values=fv)
    flags.DEFINE_string("dst", None, "destination folder", required=True, flag_values=fv)
    why = "molgen2hf: convert a run trained with aligned positions anyway, with a warning"
    flags.DEFINE_bool("allow_position_mismatch", False, why, flag_values=fv)
    return fv


def _cli(a, argv):
    if len(argv) != 2 or argv[1] not in ("hf2molgen", "molgen2hf"):
        raise app.UsageError(f"expected one subcommand, hf2molgen or molgen2hf; got {argv[1:]}")
    try:
        if argv[1] == "hf2molgen":
            out = hf2molgen(a.src, a.dst)
        else:
            out = molgen2hf(a.src, a.dst, a.allow_position_mismatch)
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"{argv[1]}: {e}")
    print(f"wrote {out}")


def main(argv=None):
    """The CLI in this process: main(["molgen2hf", "--src=runs/x", "--dst=out"]); None: from the shell."""
    cli.run("molgen.lm.convert", _flags, _cli, argv, positional=1, errors=())  # its own messages: see _cli


if __name__ == "__main__":
    main()
