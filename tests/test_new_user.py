"""A new user's day (issue 15): answers that come at once, messages that name the fix, and
output a person can read."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "cv2", "av", "decord")

# Runs the CLI in a fresh interpreter and reports, after its exit, its code and which of the
# heavy libraries it had imported.
_PROBE = """
import json, sys
from vidpipe.pipeline.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "imported": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def run_cli_fresh(*argv: str, cwd: Path) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr.strip()


@pytest.mark.parametrize("argv, message", [
    (["detect", "missing.mp4", "--checkpoint", "run/last.pt"], "error: missing.mp4: file not found"),
    (["detect", "clip.mp4", "--checkpoint", "missing.pt"], "error: missing.pt: checkpoint not found"),
    (["extract", "missing/", "--out", "cache"], "error: missing/: no such folder or file"),
    (["eval", "--checkpoint", "missing.pt", "--cache", "cache"], "error: missing.pt: checkpoint not found"),
])
def test_a_missing_file_is_answered_before_torch_is_imported(tmp_path, argv, message):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"")
    (tmp_path / "clip.mp4").write_bytes(b"")
    result, err = run_cli_fresh(*argv, cwd=tmp_path)
    assert err == message
    assert result == {"code": 2, "imported": []}


def test_a_run_folder_given_as_checkpoint_names_its_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "last.pt", "epoch_3.pt"):
        (run / name).write_bytes(b"")
    result, err = run_cli_fresh("eval", "--checkpoint", "run", "--cache", "cache", cwd=tmp_path)
    assert err == ("error: run: a folder, not a checkpoint file; it holds last.pt, best.pt, "
                   "epoch_3.pt: give one of them, e.g. run/last.pt")
    assert result["code"] == 2


def test_the_python_api_says_the_same_of_a_run_folder(tmp_path):
    from vidpipe import VidpipeError, evaluate

    (tmp_path / "last.pt").write_bytes(b"")
    with pytest.raises(VidpipeError, match=r"a folder, not a checkpoint file; it holds last.pt"):
        evaluate(tmp_path, tmp_path)
