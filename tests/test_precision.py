"""The one precision setting: `auto` by capability (faked), the refusals, what autocast does."""
import json

import numpy as np
import pytest
import torch

from vidpipe.core.errors import VidpipeError
from vidpipe.core.precision import Capabilities, autocast, cpu_capabilities, cpu_flags, resolve_precision

CPU = torch.device("cpu")
ZEN4 = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni"}


@pytest.mark.parametrize("flags, level, bf16, int8", [
    (ZEN4, "AVX512", True, True),                         # Zen 4, Sapphire Rapids without AMX
    ({"avx2", "avx512f", "avx512_vnni"}, "AVX512", False, True),   # Cascade Lake: VNNI, no bf16
    ({"avx2", "avx_vnni"}, "AVX2", False, True),          # Alder Lake
    ({"avx2"}, "AVX2", False, False),                     # Zen 2, Haswell
    ({"avx512_bf16", "amx_bf16", "amx_int8"}, "AVX2", False, True),  # torch without AVX512 kernels
    ({"amx_bf16", "amx_int8", "avx512f"}, "AVX512", True, True),  # Sapphire Rapids, AMX only named
    (set(), "DEFAULT", False, False),                     # no /proc/cpuinfo
])
def test_capabilities_are_read_from_flags_and_torch(flags, level, bf16, int8):
    caps = cpu_capabilities(flags, level)
    assert (caps.bf16, caps.int8) == (bf16, int8)
    assert level in caps.source


@pytest.mark.parametrize("bf16, int8, detector, expected", [
    (True, True, True, "int8"), (True, True, False, "bf16"),
    (False, True, True, "int8"), (False, True, False, "fp32"),
    (True, False, True, "bf16"), (False, False, True, "fp32"), (False, False, False, "fp32"),
])
def test_auto_on_a_cpu_picks_by_capability(bf16, int8, detector, expected):
    caps = Capabilities("cpu", bf16=bf16, fp16=False, int8=int8, source="fake")
    assert resolve_precision("auto", CPU, int8_ok=detector, capabilities=caps) == expected


@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda_is_half_precision_autocast(bf16, expected):
    caps = Capabilities("cuda", bf16=bf16, fp16=True, int8=False, source="fake gpu")
    assert resolve_precision("auto", torch.device("cuda"), int8_ok=True, capabilities=caps) == expected


@pytest.mark.parametrize("requested, device_type, int8_ok, message", [
    ("int8", "cpu", False, "detector"),
    ("int8", "cuda", True, "CPU only"),
    ("fp16", "cpu", False, "CUDA"),
    ("fp64", "cpu", False, "choose one of fp32, bf16, fp16, int8, auto"),
])
def test_a_precision_the_device_cannot_run_is_a_one_line_error(requested, device_type, int8_ok, message):
    caps = Capabilities(device_type, bf16=True, fp16=device_type == "cuda", int8=True, source="fake")
    with pytest.raises(VidpipeError, match=message) as error:
        resolve_precision(requested, torch.device(device_type), int8_ok=int8_ok, capabilities=caps)
    assert "\n" not in str(error.value)


def test_explicit_bf16_runs_without_native_support():
    """bf16 is emulated (slower) without the flags: asked for, it runs; only auto avoids it."""
    caps = Capabilities("cpu", bf16=False, fp16=False, int8=False, source="fake")
    assert resolve_precision("bf16", CPU, capabilities=caps) == "bf16"


def test_autocast_runs_products_in_the_precision_asked_for():
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with autocast(CPU, "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    for precision in ("fp32", "int8"):
        with autocast(CPU, precision):
            assert (a @ b).dtype == torch.float32


def test_cpu_flags_read_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "absent") == set()


# -- training ----------------------------------------------------------------------------------
def test_training_runs_in_bf16_on_a_cpu_and_differs_from_fp32(tmp_path):
    from train_helpers import random_cache, write_config
    from vidpipe.malt.train import train

    cache = random_cache(tmp_path / "cache", num_train=2, num_test=1, steps=24)
    losses = {}
    for precision in ("fp32", "bf16"):
        config = write_config(tmp_path / f"{precision}.yaml", train={"epochs": 1, "precision": precision})
        history = train(config, cache, tmp_path / precision, progress=False)
        losses[precision] = history[-1]["train_loss"]
    assert np.isfinite(losses["bf16"]) and losses["bf16"] != losses["fp32"]
    assert abs(losses["bf16"] - losses["fp32"]) < 0.05 * abs(losses["fp32"])


def test_a_config_saved_with_train_amp_reads_as_its_precision():
    from vidpipe.malt.config import saved_config

    assert saved_config({"train": {"amp": True}}).train.precision == "fp16"
    assert saved_config({"train": {"amp": False}}).train.precision == "fp32"


def test_eval_runs_the_model_in_the_precision_asked_and_says_so(tmp_path, capsys):
    from train_helpers import random_cache, write_config
    from vidpipe.malt.evaluate import evaluate
    from vidpipe.malt.train import train
    from vidpipe.pipeline.cli import main

    cache = random_cache(tmp_path / "cache", num_train=2, num_test=2, steps=40)
    train(write_config(tmp_path / "c.yaml", train={"epochs": 2}), cache, tmp_path / "run", progress=False)
    checkpoint = tmp_path / "run" / "last.pt"
    reports = {p: evaluate(checkpoint, cache, device="cpu", precision=p) for p in ("fp32", "bf16")}
    assert {p: r["precision"] for p, r in reports.items()} == {"fp32": "fp32", "bf16": "bf16"}
    assert abs(reports["bf16"]["mAP"] - reports["fp32"]["mAP"]) < 0.02
    main(["eval", "--checkpoint", str(checkpoint), "--cache", str(cache), "--precision", "bf16",
          "--out", str(tmp_path / "eval.json")])
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["precision"] == "bf16" and abs(written["mAP"] - reports["bf16"]["mAP"]) < 1e-6
