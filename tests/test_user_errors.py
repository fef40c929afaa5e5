"""User mistakes found by using the CLI as a researcher would: each gives one line
`error: ...` naming the file or option and exits 2, never a traceback or a silent ignore."""
from pathlib import Path

import pytest
import yaml
import torch

from vidpipe.malt.config import Config, validate_model_config
from vidpipe.pipeline.cli import main
from vidpipe.core.config import load_config
from vidpipe.pipeline.extract import load_settings
from vidpipe.core.errors import VidpipeError
from train_helpers import cli_error, random_cache, write_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 1-epoch run on a tiny cache: (cache, run folder)."""
    root = tmp_path_factory.mktemp("qa")
    cache = random_cache(root / "cache")
    config = write_config(root / "tiny.yaml", train={"epochs": 1})
    main(["train", "--config", str(config), "--cache", str(cache), "--out", str(root / "run")])
    return cache, root / "run"


def test_a_file_that_is_not_a_checkpoint(run, tmp_path, capsys):
    cache, _ = run
    text = tmp_path / "annotations.csv"
    text.write_text("video,label,start_s,end_s\n")
    err = cli_error(capsys, ["eval", "--checkpoint", str(text), "--cache", str(cache)])
    assert "annotations.csv: not a vidpipe checkpoint" in err and "weights_only" not in err


def test_bad_device_names_the_device(run, tmp_path, capsys, monkeypatch):
    cache, folder = run
    err = cli_error(capsys, ["train", "--config", str(write_config(tmp_path / "c.yaml")),
                             "--cache", str(cache), "--out", str(tmp_path / "r"), "--device", "gpu"])
    assert "device 'gpu': not a torch device" in err
    err = cli_error(capsys, ["eval", "--checkpoint", str(folder / "last.pt"), "--cache", str(cache),
                             "--device", "gpu"])
    assert "device 'gpu': not a torch device" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = cli_error(capsys, ["eval", "--checkpoint", str(folder / "last.pt"), "--cache", str(cache),
                             "--device", "cuda"])
    assert "device 'cuda': CUDA is not available" in err and "checkpoint" not in err


def test_resume_extends_epochs_and_refuses_other_overrides(run, capsys):
    cache, folder = run
    err = cli_error(capsys, ["train", "--cache", str(cache), "--out", str(folder), "--resume",
                             "--set", "model.d_model=32"])
    assert "--set: differs from the config of the run" in err and "model.d_model" in err
    # nothing left to do: said, not silently skipped
    main(["train", "--cache", str(cache), "--out", str(folder), "--resume"])
    assert "nothing to do" in capsys.readouterr().out
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 1
    # more epochs extend the run
    main(["train", "--cache", str(cache), "--out", str(folder), "--resume", "--set", "train.epochs=2"])
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 2


def test_random_init_with_a_weights_file_is_refused(tmp_path):
    weights = tmp_path / "rgb.pth"
    weights.write_bytes(b"x")
    with pytest.raises(VidpipeError, match="random_init excludes weights files.*rgb_weights"):
        load_settings(None, (), random_init=True, rgb_weights=str(weights))


@pytest.mark.parametrize("name", ["malt_thumos.yaml", "malt_tvseries.yaml", "demo.yaml"])
@pytest.mark.parametrize("branches", [1, 2, 3, 4])
def test_num_branches_ablation_is_one_override(name, branches):
    """README: `--set model.num_branches=N` is the whole ablation, for every shipped config:
    nothing else changes, and the model built from it has N branches and N decoder stages."""
    import dataclasses
    from vidpipe.malt.model import MALT

    path = REPO / "configs" / name
    shipped = load_config(Config, path, [])
    cfg = load_config(Config, path, [f"model.num_branches={branches}"])
    validate_model_config(cfg.model, str(path))
    undone = dataclasses.replace(cfg.model, num_branches=shipped.model.num_branches)
    assert dataclasses.replace(cfg, model=undone) == shipped          # nothing else changed
    # the shipped per-branch settings at a size that builds in milliseconds
    small = dataclasses.replace(cfg.model, rgb_dim=6, flow_dim=5, num_classes=3, d_model=16, num_heads=2,
                                ffn_dim=16, long_memory_steps=16, long_memory_stride=4)
    model = MALT(small).eval()
    assert len(model.encoder.branches) == len(model.decoder.stages()) == branches
    num_short = small.short_memory_steps
    window = (torch.randn(1, 4, 6), torch.randn(1, 4, 5), torch.ones(1, 4, dtype=torch.bool),
              torch.randn(1, num_short, 6), torch.randn(1, num_short, 5))
    with torch.no_grad():
        assert len(model(*window).aux_logits) == branches


@pytest.mark.parametrize("name", ["malt_thumos.yaml", "malt_tvseries.yaml"])
def test_paper_configs_take_feature_sizes_from_the_data(name):
    """The README trains the paper configs on imported features (2048 + 1024-d) and on
    extracted ones (other sizes): sizes and class count must come from the cache, not the file."""
    model = yaml.safe_load((REPO / "configs" / name).read_text())["model"]
    assert not {"rgb_dim", "flow_dim", "num_classes"} & set(model)


def test_every_option_has_help():
    import click

    from vidpipe.pipeline.cli import cli

    missing = [f"{name} {param.opts[0]}" for name, command in cli.commands.items()
               for param in command.params if isinstance(param, click.Option) and not param.help]
    assert not missing, missing
    assert all(command.help for command in cli.commands.values())


def test_an_output_file_where_a_folder_goes_or_the_reverse(run, tmp_path, capsys):
    """Each used to end in a traceback (NotADirectoryError, IsADirectoryError, FileExistsError)."""
    cache, folder = run
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    checkpoint = str(folder / "last.pt")
    for argv, option, problem in [
        (["extract", str(tmp_path), "--out", str(a_file), "--random-init"], "--out", "is a file"),
        (["labels", str(a_file), "--cache", str(cache), "--out", str(tmp_path)], "--out", "is a directory"),
        (["export-features", str(cache), str(a_file)], "OUT", "is a file"),
        (["train", "--config", "demo", "--cache", str(cache), "--out", str(a_file)], "--out", "is a file"),
        (["eval", "--checkpoint", checkpoint, "--cache", str(cache), "--out", str(tmp_path)], "--out",
         "is a directory"),
        (["detect", str(a_file), "--checkpoint", checkpoint, "--events", str(tmp_path)], "--events",
         "is a directory"),
        (["detect", str(a_file), "--checkpoint", checkpoint, "--render", str(tmp_path)], "--render",
         "is a directory"),
        (["detect", str(a_file), "--checkpoint", checkpoint, "--out", str(a_file)], "--out", "is a file"),
    ]:
        err = cli_error(capsys, argv)
        assert f"Invalid value for '{option}'" in err and problem in err, argv


def test_model_info_and_extract_blame_the_set_not_the_file(capsys):
    """A bad --set used to be reported as 'defaults: ...' or as the YAML file's fault."""
    for argv, start in [
        (["model-info", "--set", "model.num_branches=9"], "error: --set model.num_branches=9: "),
        (["model-info", "--config", "malt_thumos", "--set", "model.decoder=foo"], "error: --set: 'model.decoder'"),
        (["extract", str(REPO / "tests"), "--out", "unused", "--set", "nokey=3"],
         "error: --set: unknown config key 'nokey'"),
    ]:
        assert cli_error(capsys, argv).startswith(start), argv


def test_demo_checks_its_device_before_generating_videos(tmp_path, capsys):
    err = cli_error(capsys, ["demo", "--out", str(tmp_path / "demo"), "--device", "foo"])
    assert err == "error: device 'foo': not a torch device (cpu, cuda, cuda:1, ...)"
    assert not (tmp_path / "demo" / "data").exists()


def test_an_empty_source_name_is_not_the_current_folder(run, capsys):
    """`vidpipe detect "$VIDEO"` with VIDEO unset ran on every video under the current folder."""
    _, folder = run
    for argv in (["extract", "", "--out", "unused", "--random-init"],
                 ["detect", "", "--checkpoint", str(folder / "last.pt")]):
        assert cli_error(capsys, argv) == "error: an empty name is not a video file or folder", argv
