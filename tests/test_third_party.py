"""A clone stands alone: shipped data matches its SOURCE.md checksums, and no code names the
workspace folder beside the checkout (a user's clone has none)."""

import hashlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "third_party" / "data"
SCANNED = ("molgen", "configs", "experiments", "tests", "scripts", "benchmarks", "launch")
# the sibling folder WORD written as a relative path (dot-dot, a slash or backslash, WORD), or
# built from the parent folder and WORD; the test strings below are assembled the same way
WORD = "sha" + "red"
OUTSIDE = re.compile(
    rf"\.\.[/\\]{WORD}\b|parent\s*/\s*[\"']{WORD}[\"']|[\"']\.\.[\"']\s*,\s*[\"']\.\.[\"']\s*,\s*[\"']{WORD}[\"']"
)


def checksums(source_md: pathlib.Path) -> dict[str, str]:
    """relative path -> sha256 from the ```sha256 block of a SOURCE.md."""
    block = re.search(r"```sha256\n(.*?)```", source_md.read_text(), re.S)
    assert block, f"{source_md}: no ```sha256 block"
    return {path: digest for digest, path in (line.split(None, 1) for line in block.group(1).splitlines())}


@pytest.mark.parametrize("folder", ["crystals", "complexes", "proteins", "cg"])
def test_shipped_data_matches_source_md(folder):
    root = DATA / folder
    assert (root / "LICENSE").exists() or any(root.glob("*/LICENSE")), f"{root}: no licence"
    listed = checksums(root / "SOURCE.md")
    on_disk = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "SOURCE.md"}
    extra, missing = sorted(on_disk - set(listed)), sorted(set(listed) - on_disk)
    assert not extra and not missing, f"{root}: files not in SOURCE.md {extra[:5]}, listed but absent {missing[:5]}"
    for rel, digest in listed.items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == digest, (
            f"{root / rel}: sha256 differs from SOURCE.md"
        )


def test_no_file_names_the_workspace_folder_beside_the_checkout():
    files = [ROOT / "README.md", *(p for top in SCANNED for p in (ROOT / top).rglob("*") if p.is_file())]
    offenders = [
        f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
        for path in files
        if path.suffix in {".py", ".sh", ".sbatch", ".md", ".in", ".txt", ".json", ".toml"}
        and path != pathlib.Path(__file__).resolve()
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not offenders, "files name a path outside the repository:\n" + "\n".join(offenders)


def test_outside_pattern_catches_the_old_forms():
    # the forms the crystal config and tests used before the data moved into third_party/
    assert OUTSIDE.search(f'MP20 = ROOT.parent / "{WORD}" / "data"')
    assert OUTSIDE.search(f'os.path.join(os.path.dirname(__file__), "..", "..", "{WORD}", "data")')
    assert OUTSIDE.search(f"see ../{WORD}/REFERENCE.md")
    assert not OUTSIDE.search(f"the {WORD} loop in seed_<k>/")
