"""The README's map of the code names every module of every package (and no module that is gone)."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["core", "store", "extractors", "malt", "pipeline"]


def map_rows() -> dict[str, str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Map of the code", 1)[1].split("\n## ", 1)[0]
    return {match.group(1): match.group(2) for match in
            re.finditer(r"^\| `(\w+)/` \(`vidpipe[.\w]*`\) \| [^|]* \| (.*) \|$", section, re.M)}


def test_every_module_is_on_the_map():
    rows = map_rows()
    for package in PACKAGES:
        modules = {p.stem for p in (REPO / package).glob("*.py") if p.stem != "__init__"}
        named = _module_like(rows[package])
        assert modules <= named, f"{package}/ on the README map lacks {sorted(modules - named)}"
        gone = named - modules
        assert not gone, f"README map names {sorted(gone)} in {package}/, which has no such module"


def _module_like(row: str) -> set[str]:
    """Backticked names that read as modules: a bare lower-case word, or word.Name."""
    return {name.split(".")[0] for name in re.findall(r"`([a-z_]+(?:\.[A-Za-z_]+)?)`", row)}
