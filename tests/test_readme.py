"""The README's Python example runs as written, on a small stand-in for `make demo`'s folder."""
import re
import subprocess
import sys
from pathlib import Path

from train_helpers import random_cache

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- README example: tests/test_readme.py runs this block as written -->"


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(re.escape(MARKER) + r"\n```python\n(.*?)```", text, re.S)
    assert match, "the README's Python example (after its marker) is missing"
    return match.group(1)


def small_demo_folder(root: Path) -> None:
    """demo_out/cache as `vidpipe demo` leaves it for the example (features, labels.h5 with
    train and test splits), smaller: 3 videos of 80 steps with 4 action classes."""
    random_cache(root / "demo_out" / "cache", num_train=2, num_test=1, steps=80, num_classes=5)


def test_the_readme_python_example_runs(tmp_path):
    small_demo_folder(tmp_path)
    run = subprocess.run([sys.executable, "-c", readme_example()], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"per-frame mAP \d\.\d{3} on 1 held-out videos", run.stdout), run.stdout
    assert (tmp_path / "demo_out" / "run_py" / "last.pt").is_file()
    # vidpipe's own lines arrive through logging (basicConfig writes them to stderr)
    assert '"epoch": 5' in run.stderr or "epoch 5" in run.stderr, run.stderr[-3000:]
