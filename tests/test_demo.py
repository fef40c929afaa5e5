"""The demo end to end, smaller: synthetic videos -> features -> MALT -> mAP -> timeline;
and the README's demo figures, which `make readme-figures` writes from one run."""
import importlib.util
import json
import logging
from pathlib import Path

import matplotlib.image

from vidpipe.pipeline.demo import SUMMARY_FILE, DemoSettings, run_demo
from vidpipe.pipeline.timeline import Timeline

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("readme_figures", REPO / "scripts" / "readme_figures.py")
figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(figures)
STALE = "the demo no longer prints the figures the README quotes: run `make readme-figures`"


def test_small_demo_learns_well_above_chance(tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="vidpipe")
    result = run_demo(tmp_path, DemoSettings(**figures.CHECK_DEMO), progress=False)
    # Chance is each class's share of the steps (~0.17 here; measured mAP 0.58); the floor leaves room for
    # run-to-run noise of a few held-out videos while still proving that it learns.
    assert result.chance_mAP < 0.25
    assert result.mAP > 0.4, f"mAP {result.mAP:.3f} (chance {result.chance_mAP:.3f})"
    timeline = Timeline.load(result.timeline_json)
    assert timeline.class_names == ["background", "Bounce", "Slide", "Spin", "Pulse"]
    assert len(timeline.probs) == 64  # 16 s of 0.25 s steps, streamed from the mp4
    assert matplotlib.image.imread(result.timeline_png).shape[:2] == (700, 1600)
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary["mAP"] == result.mAP
    # the held-out videos chose nothing: the model is the last epoch's; a fifth of the
    # training videos were held out as validation videos, and the event rules chosen on them
    assert summary["selection"].startswith("validation videos held out of split 'train'")
    assert result.checkpoint.endswith("last.pt")
    assert set(summary["events"]) == {"default", "calibrated"}
    assert "event metrics on held-out videos (default rules -> rules calibrated" in result.summary()
    assert result.summary().startswith("per-frame mAP on held-out videos")
    # each stage is logged as it ends (live events included); nothing is printed
    logged = [r.getMessage() for r in caplog.records]
    assert any("per-frame mAP on 4 held-out videos" in line for line in logged)
    assert any(line.startswith("# ") and "live detection" in line for line in logged)
    assert capsys.readouterr().out == ""
    # The run that wrote the README's figures ran this demo too: if this one now prints other
    # figures, `make demo` prints other figures than the README's.
    record = json.loads(figures.RECORD.read_text())
    assert figures.figure_lines(result.summary()) == record["check"]["figures"], STALE


def test_the_readme_quotes_what_the_recorded_demo_printed():
    """The README's demo block and decision line are those of the run in docs/demo_figures.json
    (the script writes both; a hand edit of either shows here)."""
    record = json.loads(figures.RECORD.read_text())
    printed, decision = figures.readme_quotes((REPO / "README.md").read_text())
    assert printed == record["printed"] and decision == record["decision"], STALE
    assert printed[0].startswith("per-frame mAP on held-out videos: ")
    assert record["check"]["settings"] == figures.CHECK_DEMO


def test_a_rerun_keeps_what_later_commands_wrote_into_the_folder(tmp_path):
    """The README's next command writes demo_out/run/detections/; `make demo` again used to
    delete the whole run folder."""
    settings = DemoSettings(num_videos=2, duration_s=10.0, epochs=1)
    run_demo(tmp_path, settings, progress=False)
    later = tmp_path / "run" / "detections" / "synth_001.mp4.timeline.json"
    later.parent.mkdir()
    later.write_text("{}")
    (tmp_path / "review.mp4").write_bytes(b"video")
    first_model = (tmp_path / "run" / "last.pt").stat().st_mtime_ns
    result = run_demo(tmp_path, settings, progress=False)
    assert later.read_text() == "{}" and (tmp_path / "review.mp4").read_bytes() == b"video"
    assert (tmp_path / "run" / "last.pt").stat().st_mtime_ns > first_model   # trained anew
    assert json.loads((tmp_path / SUMMARY_FILE).read_text())["mAP"] == result.mAP


def test_the_readme_s_decision_line_leaves_out_the_wall_time_latency():
    """The README quotes the decision without the latency detect prints after it (a wall time:
    it would change the README on every run of `make readme-figures`)."""
    printed = ("# demo_out/data/videos/synth_036.mp4: live detection, 4 classes, step 0.25 s\n"
               "synth_037.mp4  00:00:01.25  start  Spin  0.98  (decided 492 ms after the chunk's last frame)\n"
               "synth_036.mp4  00:00:03.50  start  Pulse  0.98  (decided 1058 ms after the chunk's last frame)\n")
    assert figures.first_start(printed) == "synth_036.mp4  00:00:03.50  start  Pulse  0.98"
    assert figures.first_start(printed.replace("  (decided 1058 ms after the chunk's last frame)", "")) \
        == "synth_036.mp4  00:00:03.50  start  Pulse  0.98"


def test_the_review_frame_is_taken_when_the_timeline_says_the_first_start_was_decided(tmp_path):
    import numpy as np

    from vidpipe.pipeline.timeline import TimelineSettings

    probs = np.zeros((40, 3), np.float32)
    probs[:, 0] = 1.0
    probs[12:30, [0, 2]] = 0.0, 1.0          # "Slide" on from 3.0 s
    probs[4:20, [0, 1]] = 0.0, 1.0           # "Bounce" on from 1.0 s: the first start
    timeline = Timeline.from_probs(probs, np.arange(40) * 0.25, ["background", "Bounce", "Slide"], 0.25,
                                   TimelineSettings(min_duration_s=0.5))
    path = timeline.save_json(tmp_path / "v.timeline.json")
    # decided once the segment has lasted min_duration_s: at the end of its second step, 1.5 s
    assert figures.decided_at(path) == 1.5
