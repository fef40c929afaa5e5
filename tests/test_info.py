"""model-info (malt/info.py): parameters per block, multiply-adds per step and per window."""
import pytest

from vidpipe.malt.info import model_info
from vidpipe.malt.model import MALT
from model_helpers import tiny_config


def test_model_info_counts_blocks_and_shows_recurrent_is_smaller():
    cfg = tiny_config(num_branches=3)
    info = model_info(cfg)
    total = info.params.pop("total")
    assert total == sum(info.params.values()) == sum(p.numel() for p in MALT(cfg).parameters())
    assert info.decoder_params["cascaded"] == 3 * info.decoder_params["recurrent"]
    assert 0 < info.macs_per_step < info.macs_per_window
    # The encoder's work is spread over each cycle of long_memory_stride steps.
    assert 0 < info.macs_min_step <= info.macs_per_step <= info.macs_max_step < info.macs_per_window


def test_model_info_cli(capsys):
    from vidpipe.pipeline.cli import main
    main(["model-info", "--set", "model.d_model=32", "--set", "model.ffn_dim=32",
          "--set", "model.long_memory_steps=64", "--set", "model.short_memory_steps=8",
          "--set", "model.branch_queries=[8, 4]", "--set", "model.rgb_dim=8", "--set", "model.flow_dim=8"])
    out = capsys.readouterr().out
    assert "encoder branch 2" in out and "recurrent" in out and "cascaded" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["model-info", "--set", "model.num_branches=9"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "model.num_branches" in err and "\n" not in err
