"""Inputs checked where they enter: flow methods (one registry), folders that cannot be
listed, labels JSON whose values have the wrong type."""
from __future__ import annotations

import json
import subprocess
import sys
import typing

import pytest
from extract_helpers import TINY, make_video, without_root_read_override

from vidpipe.core.errors import VidpipeError
from vidpipe.extractors.features import FeatureSettings
from vidpipe.extractors.flow import OpenCVFlow
from vidpipe.extractors.flow_methods import FLOW_METHODS
from vidpipe.pipeline.cli import main
from vidpipe.pipeline.extract import load_settings
from vidpipe.store.labels import read_annotations

KNOWN = "auto, tvl1, dis, raft"
TINY_OPTIONS = ["--flow", "dis", "--rgb-backbone", "resnet18", "--flow-backbone", "resnet18",
                "--random-init", "--set", f"resize={TINY['resize']}", "--set", f"crop={TINY['crop']}",
                "--no-progress"]


# --- flow methods: one registry ------------------------------------------------------------

def test_the_flow_registry_is_what_settings_cli_and_builder_accept():
    assert list(FLOW_METHODS) == KNOWN.split(", ")
    hint = typing.get_type_hints(FeatureSettings)["flow_method"]
    assert typing.get_args(hint) == tuple(FLOW_METHODS)
    for name in ("tvl1", "dis"):
        assert name in OpenCVFlow(name).identity


@pytest.mark.parametrize("make", [
    lambda: load_settings(None, (), flow_method="farneback"),
    lambda: load_settings(None, ["flow_method=farneback"]),
    lambda: FeatureSettings(flow_method="farneback").validate(),
    lambda: OpenCVFlow("farneback"),
    lambda: OpenCVFlow("raft"),            # known, but not an OpenCV method
], ids=["option", "set", "settings", "opencv", "opencv-raft"])
def test_an_unknown_flow_method_is_refused_naming_the_known_ones(make):
    with pytest.raises(VidpipeError) as error:
        make()
    message = str(error.value)
    assert "farneback" in message or "raft" in message
    assert "\n" not in message and "tvl1" in message and "dis" in message


def test_the_cli_refuses_an_unknown_flow_method_listing_the_known_ones(tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    with pytest.raises(SystemExit) as exit_code:
        main(["extract", str(tmp_path / "videos"), "--out", str(tmp_path / "cache"),
              "--flow", "farneback"])
    error = capsys.readouterr().err
    assert exit_code.value.code == 2 and "farneback" in error and error.count("\n") == 1
    for name in FLOW_METHODS:
        assert name in error


# --- folders that cannot be listed ---------------------------------------------------------

def test_a_folder_that_cannot_be_listed_is_reported_like_a_bad_file(tmp_path):
    videos = tmp_path / "videos"
    locked = videos / "locked"
    locked.mkdir(parents=True)
    make_video(videos / "one.mp4", frames=24)
    make_video(locked / "two.mp4", frames=24)
    locked.chmod(0o000)
    try:
        run = subprocess.run(
            [*without_root_read_override(), sys.executable, "-m", "vidpipe.pipeline.cli", "extract",
             str(videos), "--out", str(tmp_path / "cache"), *TINY_OPTIONS],
            capture_output=True, text=True, timeout=300)
    finally:
        locked.chmod(0o755)
    assert run.returncode == 1, run.stderr
    failures = [line for line in run.stdout.splitlines() if line.startswith("  failed: ")]
    assert len(failures) == 1 and str(locked) in failures[0], run.stdout
    assert "cannot list the folder (Permission denied)" in failures[0]
    assert "1 extracted" in run.stdout and "1 failed" in run.stdout


# --- labels JSON values of the wrong type --------------------------------------------------

@pytest.mark.parametrize("segment, words", [
    ({"label": "Spin", "start_s": True, "end_s": 2.0}, "start/end must be numbers"),
    ({"label": "Spin", "start_s": 0.5, "end_s": [2.0]}, "start/end must be numbers"),
    ({"label": {"name": "Spin"}, "start_s": 0.5, "end_s": 2.0}, "label must be a class name"),
])
def test_labels_json_with_values_of_the_wrong_type_is_a_one_line_error(tmp_path, segment, words):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"videos": {"a.mp4": {"segments": [segment]}}}))
    with pytest.raises(VidpipeError) as error:
        read_annotations(path)
    message = str(error.value)
    assert message.startswith(f"{path}: videos.a.mp4.segments[0]: ") and words in message
    assert "\n" not in message


def test_activitynet_labels_with_a_dict_as_label_are_a_one_line_error(tmp_path):
    path = tmp_path / "activitynet.json"
    path.write_text(json.dumps({"database": {"v1": {"subset": "training", "annotations": [
        {"segment": [1.0, 2.0], "label": {"x": 1}}]}}}))
    with pytest.raises(VidpipeError, match=r"database\.v1\.annotations\[0\]: label must be a class name"):
        read_annotations(path)
