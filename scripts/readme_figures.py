"""Regenerate the README's demo figures from one run: `make readme-figures`.

Runs what the README shows, in its folder `demo_out/` — `vidpipe demo --out demo_out`, then
the live detection of two held-out videos with events and a review video — and writes, from
what those commands print:
  - README.md between `<!-- demo figures -->` markers: the lines the demo ends with (per-frame
    mAP and chance level, event metrics, where the timeline picture is);
  - README.md between `<!-- decision -->` markers: the first start decision detect printed,
    without the wall-time latency it ends with (that differs from run to run and machine to
    machine; the README keeps reproducible figures only);
  - docs/demo_timeline.png (the demo's timeline picture) and docs/detect_render.png (a frame
    of the review video, half a second after the first start was decided);
  - docs/demo_figures.json, the record tests/test_demo.py holds the README to. It also keeps
    the figures of the smaller demo that test runs anyway (CHECK_DEMO, a minute): when the
    code no longer prints those, it no longer prints the README's, and the test says to run
    this script again.

Run it after any change that moves the demo's numbers (training, model, features, events);
it takes the time of `make demo` plus the check demo and a detect run (about 4 minutes on
an idle 2-core machine).
"""
from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RECORD = REPO / "docs" / "demo_figures.json"
TIMELINE_PNG = REPO / "docs" / "demo_timeline.png"
RENDER_PNG = REPO / "docs" / "detect_render.png"
OUT = "demo_out"                                   # the README's folder, relative to the checkout
LIVE_VIDEOS = ("synth_036.mp4", "synth_037.mp4")   # the README's two held-out videos
CHECK_DEMO = {"num_videos": 16, "duration_s": 16.0, "epochs": 40}   # tests/test_demo.py's demo
BLOCK = re.compile(r"(<!-- demo figures: .*? -->\n```\n)(.*?)(```\n<!-- end demo figures -->)", re.S)
DECISION = re.compile(r"(<!-- decision -->`)(.*?)(`<!-- /decision -->)", re.S)


def figure_lines(summary: str) -> list[str]:
    """The lines of the demo's printed summary that hold its figures (no paths, no times)."""
    lines = summary.splitlines()
    return [line for i, line in enumerate(lines)
            if line.startswith(("per-frame mAP", "event metrics"))
            or (i and lines[i - 1].startswith("event metrics") and line.startswith("  "))]


def quoted_lines(summary: str) -> list[str]:
    """What the README quotes of the summary: its figures and where the picture is."""
    picture = [line for line in summary.splitlines() if line.startswith("timeline picture:")]
    return figure_lines(summary) + picture


def readme_quotes(text: str) -> tuple[list[str], str]:
    """(the lines of the README's demo block, its example decision line)."""
    block, decision = BLOCK.search(text), DECISION.search(text)
    if block is None or decision is None:
        raise SystemExit("README.md: the demo figures' markers are missing")
    return block.group(2).splitlines(), decision.group(2)


def run(*argv: str) -> str:
    """Run a command in the checkout, its output shown as it comes; returns its stdout."""
    print("$", " ".join(argv), flush=True)
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    if process.wait():
        raise SystemExit(f"{argv[0]} {argv[1]} failed (exit code {process.returncode})")
    return "".join(lines)


def first_start(detect_output: str) -> str:
    """The first start decision detect printed for the first video (source, video time, kind,
    class, score), without the wall-time latency that follows them."""
    match = re.search(rf"^({re.escape(LIVE_VIDEOS[0])}  \S+  start  \S+  \S+)(  \(decided .*)?$",
                      detect_output, re.M)
    if match is None:
        raise SystemExit(f"detect printed no start decision for {LIVE_VIDEOS[0]}")
    return match.group(1)


def decided_at(timeline: Path) -> float:
    """Video time (s) at which a video's first start was decided (its timeline's events carry it)."""
    return min(e["decided_s"] for e in json.loads(timeline.read_text())["events"] if e["kind"] == "start")


def save_frame(video: Path, time_s: float, png: Path) -> None:
    """The frame of `video` shown at `time_s`, as a PNG."""
    import av

    with av.open(str(video)) as container:
        for frame in container.decode(video=0):
            if frame.time is not None and frame.time >= time_s:
                frame.to_image().save(png)
                return
    raise SystemExit(f"{video}: no frame at {time_s:.2f} s")


def check_demo_figures() -> list[str]:
    """The figures of tests/test_demo.py's smaller demo, run as the test runs it."""
    from vidpipe.pipeline.demo import DemoSettings, run_demo

    with tempfile.TemporaryDirectory() as folder:
        return figure_lines(run_demo(folder, DemoSettings(**CHECK_DEMO), progress=False).summary())


def main() -> None:
    vidpipe = str(Path(sys.executable).with_name("vidpipe"))
    demo_output = run(vidpipe, "demo", "--out", OUT)
    summary = demo_output[demo_output.rindex("per-frame mAP on held-out videos"):]
    (REPO / OUT / "events.jsonl").unlink(missing_ok=True)   # the command appends to it
    videos = [f"{OUT}/data/videos/{name}" for name in LIVE_VIDEOS]
    detect_output = run(vidpipe, "detect", *videos, "--checkpoint", f"{OUT}/run/last.pt", "--live",
                        "--events", f"{OUT}/events.jsonl", "--render", f"{OUT}/review.mp4")
    decision = first_start(detect_output)
    picture = next(line for line in summary.splitlines() if line.startswith("timeline picture:"))
    shutil.copyfile(REPO / picture.split(":", 1)[1].strip(), TIMELINE_PNG)
    shown = decided_at(REPO / OUT / "run" / "detections" / f"{LIVE_VIDEOS[0]}.timeline.json")
    save_frame(REPO / OUT / f"{LIVE_VIDEOS[0]}.review.mp4", shown + 0.5, RENDER_PNG)
    print("$ the check demo of tests/test_demo.py", CHECK_DEMO, flush=True)
    record = {
        "command": f"vidpipe demo --out {OUT}", "printed": quoted_lines(summary),
        "decision": decision, "seconds": float(re.search(r"done in (\d+) s", summary).group(1)),
        "check": {"settings": CHECK_DEMO, "figures": check_demo_figures()},
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "torch": version("torch")},
    }
    RECORD.write_text(json.dumps(record, indent=2) + "\n")
    text = README.read_text()
    text = BLOCK.sub(lambda m: m.group(1) + "\n".join(record["printed"]) + "\n" + m.group(3), text)
    README.write_text(DECISION.sub(lambda m: m.group(1) + decision + m.group(3), text))
    print(f"README.md, {RECORD.relative_to(REPO)}, {TIMELINE_PNG.relative_to(REPO)} and "
          f"{RENDER_PNG.relative_to(REPO)} written from this run")


if __name__ == "__main__":
    main()
