"""The synthetic action videos: real, decodable mp4 files with consistent annotations."""
import av
import numpy as np

from vidpipe.store.labels import read_annotations
from vidpipe.pipeline.synthetic import CLASSES, SyntheticSpec, generate_dataset, plan_segments


def test_dataset_files_and_annotations(tmp_path):
    spec = SyntheticSpec(num_videos=3, test_fraction=0.34, duration_s=6.0, seed=3)
    data = generate_dataset(tmp_path / "a", spec, progress=False)
    assert data.train == ["synth_000.mp4", "synth_001.mp4"] and data.test == ["synth_002.mp4"]
    with av.open(str(data.videos_dir / "synth_000.mp4")) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(frames) == 6 * spec.fps
    assert frames[0].shape == (spec.height, spec.width, 3)
    assert np.abs(frames[0].astype(int) - frames[30].astype(int)).mean() > 0.5  # it moves

    annotations = read_annotations(data.annotations)
    assert annotations.videos == data.train + data.test
    assert annotations.splits["synth_002.mp4"] == "test"
    assert {s.label for s in annotations.segments} <= set(CLASSES)
    for video in annotations.videos:
        own = [s for s in annotations.segments if s.video == video]
        assert own, "every video holds an action"
        for before, after in zip(own, own[1:]):
            assert before.end_s < after.start_s  # background between actions
        assert own[-1].end_s <= spec.duration_s
    again = generate_dataset(tmp_path / "b", spec, progress=False)
    assert again.annotations.read_text() == data.annotations.read_text()  # seeded
    # a rerun with fewer videos in the same folder leaves none of the previous run's behind
    (data.videos_dir / "mine.mp4").write_bytes(b"not the demo's")
    fewer = generate_dataset(tmp_path / "a", SyntheticSpec(num_videos=2, duration_s=6.0, seed=3), progress=False)
    assert sorted(p.name for p in fewer.videos_dir.iterdir()) == ["mine.mp4", "synth_000.mp4", "synth_001.mp4"]


def test_plan_covers_video_and_cycles_classes():
    spec = SyntheticSpec(duration_s=60.0)
    plan = plan_segments(spec, np.random.default_rng(0))
    assert plan[0][1] == 0 and plan[-1][2] == 60 * spec.fps
    assert all(a[2] == b[1] for a, b in zip(plan, plan[1:]))  # contiguous
    assert all(label is None for label, _, _ in plan[0::2])   # background, action, ...
    actions = [label for label, _, _ in plan if label]
    assert set(actions[:4]) == set(CLASSES)
