"""The README's Python example runs as written, on a small stand-in for `make demo`'s folder."""
import re
import subprocess
import sys
from pathlib import Path

from vidpipe.pipeline.demo import demo_feature_settings
from vidpipe.pipeline.extract import extract_folder
from vidpipe.pipeline.synthetic import SyntheticSpec, generate_dataset
from vidpipe.store.cache import FeatureStore
from vidpipe.store.labels import LABELS_FILE, build_labels

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- README example: tests/test_readme.py runs this block as written -->"


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(re.escape(MARKER) + r"\n```python\n(.*?)```", text, re.S)
    assert match, "the README's Python example (after its marker) is missing"
    return match.group(1)


def small_demo_folder(root: Path) -> None:
    """demo_out/data and demo_out/cache (with labels.h5) as `vidpipe demo` leaves them,
    with 2 videos (1 held out) instead of 48."""
    data = generate_dataset(root / "demo_out" / "data",
                            SyntheticSpec(num_videos=2, duration_s=10.0), progress=False)
    summary = extract_folder(data.videos_dir, root / "demo_out" / "cache",
                             demo_feature_settings(), device="cpu", progress=False)
    assert summary.ok
    store = FeatureStore.open(root / "demo_out" / "cache")
    build_labels(store, data.annotations, data.class_names).save(store.root / LABELS_FILE)


def test_the_readme_python_example_runs(tmp_path):
    small_demo_folder(tmp_path)
    run = subprocess.run([sys.executable, "-c", readme_example()], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"per-frame mAP \d\.\d{3} on 1 held-out videos", run.stdout), run.stdout
    assert (tmp_path / "demo_out" / "run_py" / "last.pt").is_file()
    # vidpipe's own lines arrive through logging (basicConfig writes them to stderr)
    assert '"epoch": 5' in run.stderr or "epoch 5" in run.stderr, run.stderr[-3000:]
