#!/usr/bin/env bash
# Fill .whl/ (git-ignored through .git/info/exclude) with what benchmarks/gpu_suite.sh needs on a
# GPU machine that has JAX, flax, optax, torch and transformers but no internet: the wheels of
# the packages it lacks, at the versions installed in .venv, for CPython 3.12 on x86-64 Linux,
# and villin's PDB (the test.pdb inside pdbfixer, for the CG benchmark). Run here, with network.
#
#   benchmarks/gpu_prep.sh            # then see benchmarks/GPU.md for the device call
#   WHL_DIR=/tmp/x benchmarks/gpu_prep.sh   # elsewhere (e.g. to measure the size)
#
# Needed: ml-collections (configs), e3nn-jax, jax-md and jraph (the CG model and neighbour lists).
# For the crystal benchmark's "+host" column: pymatgen-core, monty, orjson, ruamel.yaml (pymatgen's
# lattice from parameters); without them that column reads n/a.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
NEEDED="ml_collections e3nn-jax jax-md jraph"
HOST="pymatgen-core monty orjson ruamel.yaml"
DEST=${WHL_DIR:-.whl}
if [ "$DEST" = .whl ]; then
  mkdir -p .git/info
  grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >>.git/info/exclude
fi
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
pins=()
for p in $NEEDED $HOST; do
  pins+=("$p==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p")")
done
echo "wheels: ${pins[*]}"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${pins[@]}"
pdb=$("$PY" -c "import importlib.util, os; s = importlib.util.find_spec('pdbfixer');
print(os.path.join(s.submodule_search_locations[0], 'tests', 'data', 'test.pdb'))")
cp "$pdb" "$DEST/villin.pdb"
ls -la "$DEST"
du -sh "$DEST"
