"""Library functions stay short enough to read at once (the project's ~60-line rule); a longer
one needs its reason on its `def` line as a `# long: why` comment."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARY = ["core", "store", "extractors", "malt", "pipeline", "vidpipe"]
MAX_LINES = 60


def test_library_functions_are_short():
    long = []
    for path in sorted(p for folder in LIBRARY for p in (REPO / folder).rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_LINES and "# long:" not in lines[node.lineno - 1]:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "split these into named steps, or say why not (# long: ...):\n" + "\n".join(long)
