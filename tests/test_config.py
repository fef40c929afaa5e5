"""The one config loader: YAML + dotted overrides -> typed dataclasses, errors name the key."""
import pytest

from vidpipe.malt.config import Config
from vidpipe.core.config import load_config, to_dict
from vidpipe.core.errors import VidpipeError


def test_yaml_and_overrides_fill_typed_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  d_model: 64\n  sparse_k: 12\ntrain:\n  lr: 1\n")
    config = load_config(Config, path, ["model.sparse_k=null", "train.epochs=3",
                                        "model.decoder=cascaded"])
    assert config.model.d_model == 64
    assert config.model.sparse_k is None
    assert config.train.epochs == 3
    assert isinstance(config.train.lr, float)
    assert config.model.decoder == "cascaded"
    assert to_dict(config)["model"]["d_model"] == 64


@pytest.mark.parametrize("override, message", [
    ("model.sparse_kk=3", "unknown config key 'model.sparse_kk'"),
    ("model.decoder=parallel", "'model.decoder' must be one of"),
    ("train.epochs=many", "'train.epochs' must be an integer"),
    ("train.select_on_test=3", "'train.select_on_test' must be true or false"),
    ("train.precision=fp8", "'train.precision' must be one of"),
    ("nokey", "expected KEY=VALUE"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(VidpipeError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(Config, None, [override])


def test_missing_or_broken_file_names_the_file(tmp_path):
    with pytest.raises(VidpipeError, match="nope.yaml: config file not found"):
        load_config(Config, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(VidpipeError, match="bad.yaml: not valid YAML"):
        load_config(Config, bad)


def test_the_readmes_config_paths_work_outside_the_checkout(tmp_path, monkeypatch):
    """`--config configs/malt_thumos.yaml` (README) said 'config file not found' in any other folder."""
    shipped = load_config(Config, "malt_thumos")
    monkeypatch.chdir(tmp_path)
    assert load_config(Config, "configs/malt_thumos.yaml") == shipped
    with pytest.raises(VidpipeError, match=r"^other/malt_thumos.yaml: config file not found \(shipped configs: "):
        load_config(Config, "other/malt_thumos.yaml")
