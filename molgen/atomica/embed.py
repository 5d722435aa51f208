"""The interface-embedding CLI:
    python -m molgen.atomica.embed --workdir=runs/atomica_pretrain --out=runs/atomica_pretrain/embeddings/interfaces

writes one L2-normalised embedding per interface of the run's data (every split, or those in
--splits=train,validation,test) to OUT.npz
(`embeddings` (N, hidden) and per-row entry, structure (file name), segments, modality, split) and an index
OUT.csv, for similarity search (cosine similarity = dot product).
"""

from __future__ import annotations

from absl import flags

from molgen.core import cli


def _flags(fv):
    flags.DEFINE_string("workdir", None, "a finished atomica_pretrain run", required=True, flag_values=fv)
    flags.DEFINE_string("out", None, "output path without suffix (.npz and .csv are written)", required=True,
                        flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("batch", 8, "interfaces per forward pass", flag_values=fv)
    flags.DEFINE_list("splits", ["train", "validation", "test"], "the data splits to embed", flag_values=fv)
    return fv


def _cli(args, argv):
    from molgen.atomica import heads

    print(heads.embed(args.workdir, args.out, batch=args.batch, splits=tuple(args.splits)))


def main(argv=None):
    """The CLI in this process: main(["--workdir=X", "--out=Y"]); None: from the shell."""
    cli.run("molgen.atomica.embed", _flags, _cli, argv, errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    main()
