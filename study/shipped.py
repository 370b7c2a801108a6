"""The study files the project ships (`studies/*.yaml`), found by name wherever the project
is: in a checkout, the `studies/` folder beside the packages; in an installed wheel, the
copies it installs under `<prefix>/share/lora-soups/studies` (pyproject `data-files`),
located through the distribution's own file list. `soups run real_composition`, `soups
validate real_check` and `soups studies` use them; a path is always taken as given."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

DISTRIBUTION = "lora-soups"
INSTALLED = "share/lora-soups/studies"


def studies_dir() -> Path | None:
    """The folder of shipped study files, or None where there is none."""
    checkout = Path(__file__).resolve().parents[1] / "studies"
    if checkout.is_dir():
        return checkout
    try:
        dist = distribution(DISTRIBUTION)
    except PackageNotFoundError:
        return None
    for file in dist.files or ():
        if str(file).replace("\\", "/").endswith(f"{INSTALLED}/{Path(str(file)).name}"):
            return Path(dist.locate_file(file)).resolve().parent
    return None


def shipped_studies() -> dict[str, Path]:
    """Name -> file of every shipped study."""
    folder = studies_dir()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder else {}


def study_file(given: str | Path) -> Path:
    """The file a user means: a shipped study's by its bare name (no folder, no suffix), when
    no such file is in the working directory; else the path as given."""
    path = Path(given)
    if path.exists() or path.suffix or len(path.parts) > 1:
        return path
    return shipped_studies().get(str(given), path)


def summary(path: Path) -> str:
    """A study file's first line of description in its header comment (after the `# Run:`
    and `# Look first:` command lines): what it is."""
    for line in path.read_text().splitlines():
        text = line.lstrip("# ").strip()
        if line.startswith("#") and text and not text.startswith(("Run:", "Look first:")):
            return text
        if not line.startswith("#"):
            break
    return ""
