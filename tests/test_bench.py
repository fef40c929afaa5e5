"""The benches' shared honesty (load before and after, 'under load' marking) and
bench/gpu_check.py's argument handling, on the CPU."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import conditions  # noqa: E402  (bench/ is a folder of scripts, not a package)
import gpu_check   # noqa: E402


def test_a_table_measured_under_load_says_so():
    assert conditions.verdict(0.3, 0.4).startswith("at rest")
    for before, after in ((0.9, 0.2), (0.2, 0.6), (5.0, 6.0)):
        line = conditions.verdict(before, after)
        assert line.startswith("UNDER LOAD") and "not README-grade" in line


def test_measured_prints_the_machine_and_the_load_around_the_table(capsys, monkeypatch):
    loads = iter([0.2, 3.0])
    monkeypatch.setattr(conditions, "load_average", lambda: next(loads))
    with conditions.measured("bench/x.py"):
        print("| table |")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("bench/x.py: ") and "load average before 0.20" in lines[0]
    assert "cpu flags" in lines[0] and "torch" in lines[0]
    assert lines[1] == "| table |" and lines[2].startswith("UNDER LOAD: load average 0.20 before, 3.00 after")


def test_gpu_check_refuses_without_a_gpu_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("error: ") and "CUDA" in captured.err


def test_gpu_check_arguments():
    assert gpu_check.parse_args([]).only == list(gpu_check.CHECKS)
    assert gpu_check.parse_args(["--only", "cnn, train"]).only == ["cnn", "train"]
    assert set(gpu_check.CHECK_FUNCTIONS) == set(gpu_check.CHECKS)


@pytest.mark.parametrize("argv, message", [
    (["--only", "raft,flux"], "unknown check 'flux'"),
    (["--only", ","], "unknown check ''"),
    (["--seconds", "0"], "--seconds must be > 0"),
])
def test_gpu_check_bad_arguments_are_one_line_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_gpu_check_lists_its_checks(capsys):
    assert gpu_check.main(["--list"]) == 0
    assert capsys.readouterr().out.split() == list(gpu_check.CHECKS)
