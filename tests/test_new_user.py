"""A new user's day (issue 15): answers that come at once, messages that name the fix, and
output a person can read."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "cv2", "av", "decord")

# Runs the CLI in a fresh interpreter and reports, after its exit, its code and which of the
# heavy libraries it had imported.
_PROBE = """
import json, sys
from vidpipe.pipeline.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "imported": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def run_cli_fresh(*argv: str, cwd: Path) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr.strip()


@pytest.mark.parametrize("argv, message", [
    (["detect", "missing.mp4", "--checkpoint", "run/last.pt"], "error: missing.mp4: file not found"),
    (["detect", "clip.mp4", "--checkpoint", "missing.pt"], "error: missing.pt: checkpoint not found"),
    (["extract", "missing/", "--out", "cache"], "error: missing/: no such folder or file"),
    (["eval", "--checkpoint", "missing.pt", "--cache", "cache"], "error: missing.pt: checkpoint not found"),
])
def test_a_missing_file_is_answered_before_torch_is_imported(tmp_path, argv, message):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"")
    (tmp_path / "clip.mp4").write_bytes(b"")
    result, err = run_cli_fresh(*argv, cwd=tmp_path)
    assert err == message
    assert result == {"code": 2, "imported": []}


def test_a_run_folder_given_as_checkpoint_names_its_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "last.pt", "epoch_3.pt"):
        (run / name).write_bytes(b"")
    result, err = run_cli_fresh("eval", "--checkpoint", "run", "--cache", "cache", cwd=tmp_path)
    assert err == ("error: run: a folder, not a checkpoint file; it holds last.pt, best.pt, "
                   "epoch_3.pt: give one of them, e.g. run/last.pt")
    assert result["code"] == 2


def test_the_python_api_says_the_same_of_a_run_folder(tmp_path):
    from vidpipe import VidpipeError, evaluate

    (tmp_path / "last.pt").write_bytes(b"")
    with pytest.raises(VidpipeError, match=r"a folder, not a checkpoint file; it holds last.pt"):
        evaluate(tmp_path, tmp_path)


def test_training_off_a_terminal_prints_a_line_per_epoch_and_progress_lines(tmp_path, capsys):
    """`vidpipe train ... > log`: one readable line per epoch (not a JSON dict), and inside
    an epoch a progress line with an ETA every --log-every seconds (here: every batch)."""
    import re

    from vidpipe.pipeline.cli import main
    from train_helpers import random_cache, write_config

    cache = random_cache(tmp_path / "cache")
    config = write_config(tmp_path / "tiny.yaml", train={"epochs": 2, "batch_size": 2})
    main(["train", "--config", str(config), "--cache", str(cache), "--out", str(tmp_path / "run"),
          "--log-every", "1e-9"])
    lines = capsys.readouterr().out.splitlines()
    epochs = [line for line in lines if re.match(r"epoch \d+/2  ", line)]
    assert len(epochs) == 2, lines
    assert re.fullmatch(r"epoch 1/2  loss \d+\.\d{4}  lr \d\.\d\de-\d\d  test mAP \d\.\d{3}  "
                        r"\d+\.\d s  ETA \d+ s", epochs[0]), epochs[0]
    assert re.fullmatch(r"epoch 2/2  loss .*  test mAP \d\.\d{3}  \d+\.\d s", epochs[1]), epochs[1]
    progress = [line for line in lines if line.startswith("epoch 1/2: ")]
    assert progress and re.fullmatch(r"epoch 1/2: \d+/\d+ batch, loss=\d\.\d{4}, lr=\S+, \d+ s, "
                                     r"ETA \d+ s", progress[0]), progress
    assert not any(line.lstrip().startswith("{") for line in lines)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]   # the file keeps the JSON records


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 3-epoch run on a tiny cache, evaluated every epoch: (run folder, records)."""
    from vidpipe.malt.train import train
    from train_helpers import random_cache, write_config

    root = tmp_path_factory.mktemp("tiny_run")
    cache = random_cache(root / "cache")
    config = write_config(root / "tiny.yaml", train={"epochs": 3, "batch_size": 2})
    train(config, cache, root / "run", progress=False)
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return root / "run", records


def test_tensorboard_holds_the_metrics_of_each_epoch(tiny_run):
    """Read back with TensorBoard's own reader: what `tensorboard --logdir` shows."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, records = tiny_run
    events = EventAccumulator(str(run))
    events.Reload()
    for tag, key in (("train/loss", "train_loss"), ("train/lr", "lr"), ("test/mAP", "test_mAP")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2, 3], tag
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in records], rel=1e-6), tag


def test_the_run_folder_has_a_picture_of_its_curves(tiny_run):
    """curves.png: three panels (loss, lr, mAP), each with its line drawn."""
    import matplotlib.image
    import numpy as np

    run, _ = tiny_run
    image = matplotlib.image.imread(run / "curves.png")[..., :3]     # (H, W, 3) in [0, 1]
    width = image.shape[1]

    def has_colour(panel: int, rgb: tuple[int, int, int]) -> bool:
        part = image[:, panel * width // 3:(panel + 1) * width // 3]
        return int((np.abs(part - np.array(rgb) / 255).max(axis=-1) < 0.05).sum()) > 50

    blue, orange = (31, 119, 180), (255, 127, 14)    # matplotlib's first two colours
    assert has_colour(0, blue) and has_colour(1, orange) and has_colour(2, blue)
    assert not has_colour(1, blue)    # the lr panel holds one line: the test can tell panels apart


def test_more_loader_workers_than_cores_are_capped_saying_so_once(tmp_path, caplog, recwarn):
    """The paper configs ask for 4 DataLoader workers; on a 2-core machine torch warned
    about it at every epoch. Now the run uses one per core and says so once."""
    import logging

    from vidpipe.core.device import available_cores
    from vidpipe.malt.train import train
    from train_helpers import random_cache, write_config

    caplog.set_level(logging.INFO, logger="vidpipe")
    asked = available_cores() + 7     # a number no other test asks for (said once a process)
    config = write_config(tmp_path / "tiny.yaml", train={"epochs": 2, "batch_size": 4},
                          data={"num_workers": asked})
    train(config, random_cache(tmp_path / "cache"), tmp_path / "run", progress=False)
    said = [r.getMessage() for r in caplog.records if "loader workers" in r.getMessage()]
    assert said == [f"data.num_workers={asked} on {asked - 7} available cores: "
                    f"{asked - 7} loader workers"]
    assert not [w for w in recwarn if "DataLoader" in str(w.message)]


def _relabelled(cache: Path, out: Path, order: list[str]) -> Path:
    """The cache's labels.h5 with its class columns in `order` (names, background first)."""
    import dataclasses

    from vidpipe.store.labels import LabelSet

    labels = LabelSet.load(cache / "labels.h5")
    columns = [labels.class_names.index(name) for name in order]
    videos = {video_id: dataclasses.replace(video, targets=video.targets[:, columns])
              for video_id, video in labels.videos.items()}
    LabelSet(order, videos, labels.splits).save(out)
    return out


def test_eval_maps_the_same_classes_in_another_order_by_name(tiny_run, tmp_path, caplog):
    import logging

    from vidpipe import evaluate

    run, _ = tiny_run
    cache = run.parent / "cache"
    caplog.set_level(logging.INFO, logger="vidpipe")
    same = evaluate(run / "last.pt", cache, device="cpu")
    names = same["per_class"]
    reordered = ["background", *reversed(list(names))]
    other = evaluate(run / "last.pt", cache, labels=_relabelled(cache, tmp_path / "r.h5", reordered),
                     device="cpu")
    assert other["mAP"] == same["mAP"] and other["per_class"] == same["per_class"]
    assert any("in another order: mapped by name" in r.getMessage() for r in caplog.records)


def test_eval_with_other_classes_names_the_difference_and_the_fix(tiny_run, tmp_path, capsys):
    from vidpipe.store.labels import LabelSet
    from train_helpers import cli_error

    run, _ = tiny_run
    cache = run.parent / "cache"
    names = LabelSet.load(cache / "labels.h5").class_names
    renamed = _relabelled(cache, tmp_path / "r.h5", names)
    labels = LabelSet.load(renamed)
    labels.class_names = [*names[:-1], "Jump"]
    labels.save(renamed)
    err = cli_error(capsys, ["eval", "--checkpoint", str(run / "last.pt"), "--cache", str(cache),
                             "--labels", str(renamed)])
    assert err == (f"error: {renamed}: classes differ from those of {run / 'last.pt'} "
                   f"(only in {run / 'last.pt'}: {names[-1]}; only in {renamed}: Jump); build the "
                   f"labels in its order with `vidpipe labels ... --classes {','.join(names[1:])}`")


def test_a_second_run_into_the_same_folder_names_the_callers_own_argument(tiny_run, capsys):
    from vidpipe import VidpipeError, train
    from train_helpers import cli_error

    run, _ = tiny_run
    config, cache = run.parent / "tiny.yaml", run.parent / "cache"
    with pytest.raises(VidpipeError, match=r"already holds a run \(last.pt\); pass resume=True "):
        train(config, cache, run)
    err = cli_error(capsys, ["train", "--config", str(config), "--cache", str(cache), "--out", str(run)])
    assert err == (f"error: {run}: already holds a run (last.pt); pass --resume to continue it "
                   "or choose another --out")


def test_cache_repair_does_not_advise_running_cache_repair(tmp_path, capsys):
    from vidpipe.pipeline.cli import main
    from train_helpers import random_cache

    cache = random_cache(tmp_path / "cache")
    damaged = sorted((cache / "videos").glob("*.h5"))[0]
    damaged.write_bytes(damaged.read_bytes()[:100])
    main(["cache", "repair", str(cache)])
    out = capsys.readouterr().out
    assert "1 damaged" in out and "moved to damaged/" in out
    assert "cache repair" not in out


def _timeline(ended_by: str):
    import numpy as np

    from vidpipe.pipeline.timeline import Timeline

    probs = np.full((40, 3), [0.9, 0.05, 0.05], np.float32)
    probs[10:20] = [0.05, 0.9, 0.05]                        # one Spin segment, 2.5-5.0 s
    return Timeline.from_probs(probs, np.arange(40) * 0.25, ["background", "Spin", "Pulse"], 0.25,
                               metadata={"ended_by": ended_by, "video": {"source": "cam.mp4"}})


def test_the_csv_and_png_of_an_interrupted_source_say_so(tmp_path):
    """The JSON records `ended_by`; a reader of only the CSV or the picture was not told that
    the source stopped early."""
    import csv

    import matplotlib.image
    import numpy as np

    def title_has_red(png: Path) -> bool:
        top = matplotlib.image.imread(png)[:60, :, :3]            # the title strip
        return bool((np.abs(top - np.array([178, 34, 34]) / 255).max(axis=-1) < 0.08).any())

    for ended_by in ("interrupt", "error", "eof"):
        timeline = _timeline(ended_by)
        rows = list(csv.reader(timeline.save_csv(tmp_path / f"{ended_by}.csv").open()))
        assert rows[1][:3] == ["Spin", "2.500", "5.000"]
        png = timeline.save_png(tmp_path / f"{ended_by}.png")
        if ended_by == "eof":
            assert len(rows) == 2 and not title_has_red(png)
        else:
            assert rows[-1] == [f"(ended by {ended_by})", "10.000", "10.000", ""]
            assert title_has_red(png)


def test_a_truncated_video_gets_our_message_only_not_libav_console_noise(tmp_path, capfd):
    """A cut-off mp4 (moov at the front) made the decoder's bundled libav print
    '[mov,mp4,...] stream 0, offset 0x...: partial file' on the console beside vidpipe's
    own one-line message."""
    import av

    from vidpipe import VidpipeError
    from vidpipe.extractors.decode import VideoSource
    from extract_helpers import frame_image

    whole = tmp_path / "whole.mp4"
    with av.open(str(whole), "w", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(96):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame_image(index, 64, 48), format="rgb24")))
        container.mux(stream.encode())
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[:int(whole.stat().st_size * 0.7)])
    with pytest.raises(VidpipeError, match="cut.mp4"):
        for _ in VideoSource(str(cut)).chunks():
            pass
    assert "partial file" not in capfd.readouterr().err


def test_the_editable_install_is_a_tree_static_analysers_can_follow(tmp_path):
    """pyright/Pylance, jedi and mypy look for `vidpipe/malt/model.py` under the folders on
    sys.path; they do not run setuptools' import-hook finder, so with the default editable
    install "go to definition" found nothing. `make install` installs in strict mode: a tree
    of links named as the package is (Makefile)."""
    done = subprocess.run([sys.executable, "-c", "import json, sys; print(json.dumps(sys.path))"],
                          cwd=tmp_path, capture_output=True, text=True, check=True)
    found = [Path(entry) / "vidpipe" / "malt" / "model.py" for entry in json.loads(done.stdout)
             if entry and (Path(entry) / "vidpipe" / "malt" / "model.py").is_file()]
    assert found, "no sys.path entry holds vidpipe/malt/model.py: run `make install`"
    assert found[0].samefile(REPO / "malt" / "model.py")   # this checkout's file, not a copy
