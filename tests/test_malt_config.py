"""malt/config.py's checks of a model config: one line naming the key; what depends on what."""
import pytest

from vidpipe.core.config import load_config
from vidpipe.core.errors import VidpipeError
from vidpipe.malt.config import Config, validate_model_config
from vidpipe.malt.model import MALT


@pytest.mark.parametrize("override, key", [
    ("model.num_branches=5", "model.num_branches"),
    ("model.num_branches=0", "model.num_branches"),
    ("model.branch_queries=[32]", "model.branch_queries"),
    ("model.branch_queries=[16, 16]", "model.branch_queries"),   # aux loss needs 32 = short memory
    ("model.branch_layers=[1, 0]", "model.branch_layers"),
    ("model.sparse_k=0", "model.sparse_k"),
    ("model.num_heads=7", "model.num_heads"),
    ("model.long_memory_stride=3", "model.long_memory_stride"),
    ("model.dropout=1.5", "model.dropout"),
])
def test_invalid_model_config_is_a_one_line_error_naming_the_key(override, key):
    cfg = load_config(Config, None, [override]).model
    with pytest.raises(VidpipeError) as info:
        MALT(cfg)
    message = str(info.value)
    assert key in message and "\n" not in message


def test_aux_query_count_is_free_when_aux_loss_is_off():
    cfg = load_config(Config, None, ["model.branch_queries=[16, 16]", "model.aux_loss=false"]).model
    validate_model_config(cfg)
