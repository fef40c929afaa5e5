"""Inputs checked where they enter: flow methods (one registry), folders that cannot be
listed, labels JSON whose values have the wrong type."""
from __future__ import annotations

import json
import typing

import pytest

from vidpipe.core.errors import VidpipeError
from vidpipe.extractors.features import FeatureSettings
from vidpipe.extractors.flow import OpenCVFlow
from vidpipe.extractors.flow_methods import FLOW_METHODS
from vidpipe.pipeline.cli import main
from vidpipe.pipeline.extract import load_settings

KNOWN = "auto, tvl1, dis, raft"


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
