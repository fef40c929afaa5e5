"""DDP: two CPU processes (gloo) make the same updates as one process with the same global batch."""
import json
import os
import socket

import numpy as np
import torch
import torch.multiprocessing as mp

from vidpipe.malt.config import Config
from vidpipe.malt.model import MALT
from vidpipe.malt.train import train
from vidpipe.core.config import from_dict
from train_helpers import random_cache, write_config


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, config: str, cache: str, out: str) -> None:
    # What torchrun sets for each process.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    history = train(config, cache, out, device="cpu", progress=False)
    with open(os.path.join(out, f"..{os.sep}rank{rank}.json"), "w") as handle:
        json.dump(len(history), handle)


def test_two_processes_equal_one(tmp_path):
    # 39 = 4 * 8 + 7 steps: 4 full windows whatever the offset, so 2 videos give 8 windows,
    # two global batches of 4 (no sampler padding, which would change the data).
    cache = random_cache(tmp_path / "cache", num_train=2, num_test=1, steps=39)
    # No dropout: its random draws differ between processes by design.
    config = write_config(tmp_path / "c.yaml", model={"dropout": 0.0},
                          train={"epochs": 2, "batch_size": 4, "warmup_epochs": 0})
    single = tmp_path / "single"
    train(config, cache, single, device="cpu", progress=False)

    ddp = tmp_path / "ddp" / "run"
    mp.spawn(_worker, args=(2, _free_port(), str(config), str(cache), str(ddp)), nprocs=2)
    assert json.loads((tmp_path / "ddp/rank0.json").read_text()) == 2   # rank 0 keeps the history
    assert json.loads((tmp_path / "ddp/rank1.json").read_text()) == 0

    one = torch.load(single / "last.pt", weights_only=True)
    two = torch.load(ddp / "last.pt", weights_only=True)
    assert one["step"] == two["step"] == 4
    # Summation order differs between one and two processes (float noise ~1e-6 after Adam);
    # a wrong loss normalisation across processes moves weights by ~1e-4 (checked).
    for name, tensor in one["model_state"].items():
        np.testing.assert_allclose(two["model_state"][name].numpy(), tensor.numpy(),
                                   rtol=1e-5, atol=1e-5, err_msg=name)
    # and training did move the weights (the comparison is not between two untouched models)
    torch.manual_seed(0)          # train.seed: the initial weights of both runs
    initial = MALT(from_dict(Config, one["config"]).model).state_dict()
    moved = max((initial[k] - v).abs().max().item() for k, v in one["model_state"].items())
    assert moved > 1e-4
