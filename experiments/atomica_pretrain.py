"""ATOMICA pretraining (denoising and masking) on real interfaces: Docking Benchmark 5 and PDB
entries with ligands, ions and nucleic acids (third_party/data/complexes; molgen.atomica).

    python -m molgen.main --config=experiments/atomica_pretrain.py --workdir=runs/atomica_pretrain

Variants: quick (default; depthwise tensor product, 20 minutes on 2 CPU cores), full (ATOMICA's
fully-connected tensor product, lr 1e-4), tiny (tests). Writes evaluation.json: each held-out
loss beside its trivial baseline (zero score; block-type frequency), overall and per modality.
"""

from configs import atomica


def get_config(variant: str = "quick"):
    return atomica.pretrain(variant)
