"""The layer picture of docs/architecture.md, enforced: every import points down."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package folder -> layer; a package may import its own layer's package and lower layers,
# never a sibling of its layer (extractors and malt know nothing of each other).
LAYERS = {"core": 0, "store": 1, "extractors": 2, "malt": 2, "pipeline": 3, "vidpipe": 4}
DATA_PACKAGES = {"configs"}   # shipped YAML, readable from any layer


def vidpipe_imports(path: Path) -> list[tuple[int, str]]:
    """(line, package) of every `vidpipe.<package>` import in a file, and of any import of a
    layer folder by its bare name (which would bypass the `vidpipe` namespace)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "vidpipe" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
            elif parts[0] in LAYERS and parts[0] != "vidpipe":
                found.append((node.lineno, f"bare:{parts[0]}"))
    return found


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_imports_point_down(package):
    offending = []
    for path in sorted((REPO / package).rglob("*.py")):
        for line, imported in vidpipe_imports(path):
            where = f"{path.relative_to(REPO)}:{line}"
            if imported.startswith("bare:"):
                offending.append(f"{where} imports '{imported[5:]}' outside the vidpipe namespace")
            elif imported in DATA_PACKAGES or imported == package:
                continue
            elif imported not in LAYERS or LAYERS[imported] >= LAYERS[package]:
                offending.append(f"{where} imports vidpipe.{imported} (layer "
                                 f"{LAYERS.get(imported, '?')} >= {package}'s {LAYERS[package]})")
    assert not offending, "upward or sideways imports:\n" + "\n".join(offending)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule above must be able to fail: a file importing the CLI from the kernel."""
    bad = tmp_path / "bad.py"
    bad.write_text("from vidpipe.pipeline.cli import main\nimport malt.model\n")
    assert vidpipe_imports(bad) == [(1, "pipeline"), (2, "bare:malt")]


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "malt").glob("*.py") if p.name != "__init__.py"))
def test_malt_modules_say_what_they_offer(path):
    """Each malt module's `__all__` names exactly its public classes and functions (and may
    name public constants): what a reader may use is written at the top of the file."""
    tree = ast.parse((REPO / "malt" / path).read_text())
    public = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))
              and not node.name.startswith("_")}
    declared = [ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)]
    assert declared, f"malt/{path} has no __all__"
    defined = public | {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                        if isinstance(t, ast.Name)}
    assert public <= set(declared[0]) <= defined, (sorted(public - set(declared[0])),
                                                    sorted(set(declared[0]) - defined))
