"""Library code reports through `logging` only; the CLI decides what reaches the console."""
import io
import logging

import numpy as np
import pytest

from vidpipe.core.log import configure_cli_logging, progress_bar, remove_cli_logging
from vidpipe.pipeline.cli import main
from vidpipe.store.cache import FeatureStore
from vidpipe.store.labels import write_labels


@pytest.fixture
def cache(tmp_path):
    store = FeatureStore.open_or_create(tmp_path / "cache", {"step_seconds": 0.25})
    store.write("clip.mp4", np.zeros((8, 4)), np.zeros((8, 3)), np.arange(8) * 0.25)
    annotations = tmp_path / "ann.csv"
    annotations.write_text("video,label,start_s,end_s\nclip,Spin,0.5,1.5\n")
    return store.root, annotations


def test_a_library_call_logs_and_prints_nothing(cache, caplog, capsys):
    root, annotations = cache
    caplog.set_level(logging.INFO, logger="vidpipe")
    write_labels(root, annotations)
    messages = [(r.name, r.getMessage()) for r in caplog.records]
    assert ("vidpipe.store.labels", f"labels written to {root / 'labels.h5'}") in messages
    assert capsys.readouterr() == ("", "")


def test_cli_shows_info_and_quiet_silences_it(cache, capsys):
    root, annotations = cache
    main(["labels", str(annotations), "--cache", str(root)])
    assert "labels written to" in capsys.readouterr().out
    main(["--quiet", "labels", str(annotations), "--cache", str(root)])
    assert capsys.readouterr() == ("", "")
    # the CLI leaves logging as it found it: a library call afterwards is silent again
    assert logging.getLogger("vidpipe").getEffectiveLevel() == logging.WARNING


def test_warnings_go_to_stderr_and_verbose_shows_debug(capsys):
    log = logging.getLogger("vidpipe.test")
    try:
        configure_cli_logging(1)
        log.debug("detail")
        log.warning("careful")
        out, err = capsys.readouterr()
        assert out == "detail\n" and err == "warning: careful\n"
        configure_cli_logging(-1)   # replaces the handler rather than adding a second one
        log.info("hidden")
        log.error("shown")
        assert capsys.readouterr() == ("", "error: shown\n")
    finally:
        remove_cli_logging()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal_with_info_on(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    configure_cli_logging(0)
    try:
        assert progress_bar(range(3)).disable               # redirected: no bar
        monkeypatch.setattr("sys.stderr", _Terminal())
        bar = progress_bar(range(3), desc="videos")
        assert not bar.disable and list(bar) == [0, 1, 2]   # a terminal: drawn
        assert progress_bar(range(3), enabled=False).disable
        configure_cli_logging(-1)
        assert progress_bar(range(3)).disable               # --quiet: no bar
    finally:
        remove_cli_logging()


def test_redirected_extract_logs_one_line_per_video(tmp_path, capsys):
    """`vidpipe extract ... > log 2>&1` (pytest's capture is no terminal either): no bar, no
    carriage return, a line per video."""
    from extract_helpers import make_video

    (tmp_path / "videos").mkdir()
    make_video(tmp_path / "videos" / "a.mp4", frames=12)
    make_video(tmp_path / "videos" / "b.mp4", frames=12, seed=1)
    (tmp_path / "videos" / "bad.mp4").write_bytes(b"not a video")
    extract = ["extract", str(tmp_path / "videos"), "--out", str(tmp_path / "cache"),
               "--random-init", "--rgb-backbone", "resnet18", "--flow-backbone", "resnet18",
               "--flow", "dis", "--set", "crop=48", "--set", "resize=56"]
    with pytest.raises(SystemExit) as info:
        main(extract)
    out, err = capsys.readouterr()
    assert info.value.code == 1, err
    assert "\r" not in out + err
    assert [line for line in out.splitlines() if line.startswith("extracted ")] == [
        "extracted a.mp4: 2 steps", "extracted b.mp4: 2 steps"]
    assert any(line.startswith("warning: failed: ") and "bad.mp4" in line
               for line in err.splitlines())
    # a rerun skips what is cached; --verbose says so (debug lines), the default does not
    for verbosity, shown in (["--verbose"], True), ([], False):
        with pytest.raises(SystemExit):
            main([*verbosity, *extract])
        out = capsys.readouterr().out
        assert ("skipped a.mp4: cached, unchanged" in out) == shown, out


LIBRARY = ["core", "store", "extractors", "malt", "pipeline", "vidpipe"]


def test_no_library_module_prints_or_draws_its_own_bars():
    """print, sys.stdout/stderr writes and tqdm only in the two places that own the console."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    owners = {repo / "core" / "log.py", repo / "pipeline" / "cli.py"}
    found = []
    for path in sorted(p for folder in LIBRARY for p in (repo / folder).rglob("*.py")):
        if path in owners:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                found.append(f"{path.relative_to(repo)}:{node.lineno} print")
            elif isinstance(node, ast.Attribute) and node.attr in ("stdout", "stderr") \
                    and isinstance(node.value, ast.Name) and node.value.id == "sys":
                found.append(f"{path.relative_to(repo)}:{node.lineno} sys.{node.attr}")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [alias.name for alias in node.names]
                if any(name.split(".")[0] in ("tqdm", "click") for name in names):
                    found.append(f"{path.relative_to(repo)}:{node.lineno} imports {names[0]}")
    assert not found, "library code writes to the console itself:\n" + "\n".join(found)
