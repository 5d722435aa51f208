"""Qwen3 size presets. `get(name)` returns the `model` config group."""

import ml_collections

from molgen.lm import tokenizer

_PRESETS = {
    # name: (d_model, n_layers, n_heads, n_kv_heads, head_dim, d_ff)
    "test": (64, 2, 4, 2, 16, 128),
    "cpu_tiny": (128, 4, 4, 2, 32, 384),
    "cpu_mini": (192, 4, 4, 2, 48, 576),
    "cpu_small": (256, 4, 4, 2, 64, 768),
    "cpu_base": (384, 6, 6, 2, 64, 1152),
    "qwen3_25m": (512, 8, 8, 4, 64, 1536),
    "qwen3_100m": (768, 12, 12, 4, 64, 2304),
    "qwen3_0.6b": (1024, 28, 16, 8, 128, 3072),
}


def get(name: str) -> ml_collections.ConfigDict:
    if name not in _PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(_PRESETS)}")
    d, n_layers, h, kv, hd, ff = _PRESETS[name]
    return ml_collections.ConfigDict(
        dict(
            preset=name,
            vocab_size=151936 if name == "qwen3_0.6b" else tokenizer.vocab_size(),
            d_model=d,
            n_layers=n_layers,
            n_heads=h,
            n_kv_heads=kv,
            head_dim=hd,
            d_ff=ff,
            rope_theta=1e6,
            norm_eps=1e-6,
            dtype="float32",
            remat=False,
        )
    )
