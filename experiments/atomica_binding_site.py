"""Per-residue binding sites on held-out PDB entries: the ATOMICA encoder pretrained by
experiments/atomica_pretrain.py (built first when runs/atomica_pretrain is missing), fine-tuned,
against the same model from a random encoder and a logistic regression on residue type and
relative solvent accessibility (molgen.atomica.heads).

    python -m molgen.main --config=experiments/atomica_binding_site.py --workdir=runs/atomica_binding_site

Variants: quick (default), full, tiny (tests). Writes evaluation.json (AUROC and AUPRC with
bootstrap 95% intervals over proteins, and the paired intervals of the AUROC differences), and
the two fine-tuned runs under pretrained/ and random/.
"""

from configs import atomica


def get_config(variant: str = "quick"):
    return atomica.binding_site(variant)
