"""The benches' shared honesty (load before and after, 'under load' marking, the threads they
run with) and bench/gpu_check.py's and bench/lstr_stream.py's argument handling, on the CPU."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import conditions  # noqa: E402  (bench/ is a folder of scripts, not a package)
import gpu_check   # noqa: E402
import lstr_stream  # noqa: E402


def test_a_table_measured_under_load_says_so():
    assert conditions.verdict(0.3, 0.4).startswith("at rest")
    for before, others in ((0.9, 0.2), (0.2, 0.6), (5.0, 6.0)):
        line = conditions.verdict(before, others)
        assert line.startswith("UNDER LOAD") and "not README-grade" in line


def test_measured_prints_the_machine_and_the_load_around_the_table(capsys, monkeypatch):
    monkeypatch.setattr(conditions, "load_average", lambda: 0.2)
    busy = iter([(100.0, 10.0), (130.0, 30.0)])    # machine busy 30 s, of which this process 20 s
    monkeypatch.setattr(conditions, "busy_seconds", lambda: next(busy))
    clock = iter([0.0, 10.0])                        # over 10 s: others kept 1.0 core busy
    monkeypatch.setattr(conditions.time, "monotonic", lambda: next(clock))
    with conditions.measured("bench/x.py"):
        print("| table |")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("bench/x.py: ") and "load average before 0.20" in lines[0]
    assert "cpu flags" in lines[0] and "torch" in lines[0]
    assert lines[1] == "| table |"
    assert lines[2].startswith("UNDER LOAD: load average 0.20 before, other processes 1.00 cores")


def load_bench(name: str):
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["detect", "detect_memory", "extract", "model", "streams", "train"])
def test_a_bench_s_header_names_the_threads_it_runs_with(capsys, monkeypatch, name):
    """--threads is applied before `measured` prints the machine line (the table itself is
    replaced: only the order of parse, set threads, header, table is under test)."""
    bench, default = load_bench(name), torch.get_num_threads()
    asked, seen = default + 1, []
    monkeypatch.setattr(bench, "run", lambda args: seen.append(torch.get_num_threads()))
    try:
        bench.main(["--threads", str(asked)])
    finally:
        torch.set_num_threads(default)
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith(f"bench/{name}.py: ") and f", {asked} threads" in header
    assert seen == [asked]


def test_the_bench_s_own_work_does_not_count_as_load():
    """CPU this process burns is counted as its own, and within the machine's busy time, so
    `measured` subtracts it: a bench's own threads are not 'other work'."""
    before, spent = conditions.busy_seconds(), conditions.time.process_time()
    while conditions.time.process_time() - spent < 0.5:
        pass
    after = conditions.busy_seconds()
    mine, machine = after[1] - before[1], after[0] - before[0]
    assert mine >= 0.45
    assert machine >= mine - 0.05


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


@pytest.mark.parametrize("argv, message", [
    ([], "--lstr PATH is required"),
    (["--lstr", "."], "--lstr .: not an LSTR checkout (no src/rekognition_online_action_detection/models/lstr.py)"),
])
def test_lstr_stream_refuses_without_an_lstr_checkout_in_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        lstr_stream.main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("error: bench/lstr_stream.py: " + message)
    assert "amazon-science/long-short-term-transformer" in captured.err


def test_lstr_stream_arguments(tmp_path):
    model = tmp_path / lstr_stream.LSTR_MODEL
    model.parent.mkdir(parents=True)
    model.touch()
    args = lstr_stream.parse_args(["--lstr", str(tmp_path), "--steps", "5"])
    assert (args.lstr, args.steps, args.threads) == (tmp_path, 8, 1)   # whole 4-step cycles
