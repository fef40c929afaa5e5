"""The command line as a whole: help in pipeline order, one error line for every mistake."""
import pytest

from vidpipe.pipeline.cli import PIPELINE_ORDER, cli, main
from train_helpers import cli_error


def test_help_lists_commands_in_pipeline_order_with_whole_summaries(capsys):
    main(["--help"])
    help_text = capsys.readouterr().out
    listing = help_text.split("Commands:")[1]
    names = [line.split()[0] for line in listing.splitlines() if line.startswith("  ") and
             not line.startswith("   ")]
    assert names == [name for name in PIPELINE_ORDER if name in cli.commands]
    assert "..." not in listing
    # the demo's summary runs over two source lines: shown whole, not cut at 45 characters
    assert "no data or weights needed." in " ".join(listing.split())


@pytest.mark.parametrize("argv, words", [
    (["nonsense"], "No such command 'nonsense'"),
    (["train", "--bogus"], "No such option '--bogus'"),
    (["eval"], "Missing option '--cache'"),
    (["eval", "--cache", "c"], "give --checkpoint or --timelines (one of them)"),
    (["calibrate", "--cache", "c"], "Missing option '--checkpoint'"),
    (["--quiet", "--verbose", "demo"], "--quiet and --verbose exclude each other"),
    (["demo", "--duration", "0"], "'--duration': 0.0 is not in the range x>0"),
    (["demo", "--duration", "-5"], "'--duration'"),
    (["demo", "--videos", "1"], "'--videos'"),
    (["demo", "--epochs", "0"], "'--epochs'"),
    (["demo", "--seed", "-1"], "'--seed'"),
])
def test_usage_mistakes_are_one_error_line(capsys, argv, words):
    assert words in cli_error(capsys, argv)


def test_demo_settings_checked_by_the_library_too(tmp_path):
    from vidpipe.core.errors import VidpipeError
    from vidpipe.pipeline.demo import DemoSettings, run_demo

    with pytest.raises(VidpipeError, match="demo duration_s must be positive, not 0"):
        run_demo(tmp_path, DemoSettings(duration_s=0))
    with pytest.raises(VidpipeError, match="demo seed must be 0 or more, not -1"):
        run_demo(tmp_path, DemoSettings(seed=-1))
    assert not any(tmp_path.iterdir())   # refused before anything is written


def test_shared_options_are_one_declaration_each():
    """--device, --set and train/eval's --cache/--labels are each written once in
    pipeline/cli.py (a shared decorator), and every command that has one gets the same option."""
    import inspect
    import vidpipe.pipeline.cli as cli_module

    source = inspect.getsource(cli_module)
    for flag in ('"--device"', '"--set"'):
        assert source.count(flag) == 1, f"{flag} is declared {source.count(flag)} times"
    assert source.count("@labelled_cache_options") == 3               # train, eval, calibrate

    def declaration(param, *leave_out):
        return {k: v for k, v in param.to_info_dict().items() if k not in leave_out}

    by_command = {name: {p.name: p for p in command.params} for name, command in cli.commands.items()}
    devices = {name: params["device"] for name, params in by_command.items() if "device" in params}
    assert {"extract", "train", "eval", "detect", "demo"} <= set(devices)
    # the same option everywhere; only the demo's default differs (cpu, a parameter of the decorator)
    assert all(declaration(d, "default") == declaration(devices["train"], "default") for d in devices.values())
    overrides = [params["overrides"] for params in by_command.values() if "overrides" in params]
    assert len(overrides) >= 3
    # the same option everywhere; the help shows each command's own example
    assert all(declaration(o, "help") == declaration(overrides[0], "help") for o in overrides)
    assert all(o.multiple and o.metavar == "KEY=VALUE" and o.opts == ["--set"] for o in overrides)
    for name in ("cache", "labels"):
        assert declaration(by_command["train"][name]) == declaration(by_command["eval"][name])


def test_detect_hands_every_option_to_the_library(tmp_path, monkeypatch):
    """`detect` is thin: its options reach `pipeline.detect.detect` as the library's keywords
    (DetectOptions' fields), the rule options as one `settings`, the weights as one dict."""
    import vidpipe.pipeline.detect as detect_module

    seen = {}
    monkeypatch.setattr(detect_module, "detect", lambda sources, checkpoint, **kw: seen.update(kw) or [])
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    (tmp_path / "m.pt").write_bytes(b"x")
    (tmp_path / "a.mp4").write_bytes(b"x")
    main(["detect", str(tmp_path / "a.mp4"), "--checkpoint", str(tmp_path / "m.pt"), "--live",
          "--no-picture", "--reconnect", "2", "--min-duration", "1.5", "--flow-weights", "f.pth",
          "--threads", "3"])
    assert seen["weights"] == {"flow": "f.pth"} and seen["picture"] is False and seen["live"] is True
    assert seen["threads"] == 3
    import os
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"   # (for torch's load in a fresh process)
    assert seen["reconnect"] == 2 and seen["settings"].min_duration_s == 1.5
    assert "max_pixels" not in seen                # not given: the library's own budget
    from vidpipe.pipeline.live import DetectOptions
    DetectOptions(**{k: v for k, v in seen.items() if k not in ("out", "cache", "device", "int8", "precision")})
