"""vidpipe: raw video -> two-stream features -> MALT -> online action timeline.

The Python API, the same functions the `vidpipe` command calls:

    import vidpipe
    vidpipe.extract("videos/", "cache/")                      # features -> HDF5 cache
    vidpipe.train("malt_thumos", "cache/", "runs/thumos")      # a shipped config by name, or a path
    report = vidpipe.evaluate("runs/thumos/last.pt", "cache/")  # best.pt with a validation split
    detector = vidpipe.Detector.from_checkpoint("runs/thumos/last.pt")
    probabilities = detector.step(rgb_vector, flow_vector)     # one causal step, (C+1,)
    detection = detector.run("clip.mp4", out="out/")           # a whole file or live source
    metrics = vidpipe.event_report([vidpipe.VideoEvents(duration_s, truth, segments, starts)],
                                   ["Jump", "Spin"])              # start p-AP, segment F1, edit, latency

Names are imported on first use, so `import vidpipe` (and `vidpipe --help`) stay fast.
The packages below form one-way layers (docs/architecture.md):
core <- store <- extractors, malt <- pipeline <- this module.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

# Run from the checkout's root, Python finds this folder (vidpipe/ holds only this file) before
# the installed package; its other folders (core/, malt/, ...) are then found through the
# install: the strict editable install's link tree (Makefile), or a wheel's vidpipe/.
__path__ = pkgutil.extend_path(__path__, __name__)

# public name -> (module, attribute)
_API = {
    "extract": ("vidpipe.pipeline.extract", "extract_folder"),
    "load_feature_settings": ("vidpipe.pipeline.extract", "load_settings"),
    "train": ("vidpipe.malt.train", "train"),
    "evaluate": ("vidpipe.malt.evaluate", "evaluate"),
    "detect": ("vidpipe.pipeline.detect", "detect"),
    "Detector": ("vidpipe.pipeline.detect", "Detector"),
    "FeatureStore": ("vidpipe.store.cache", "FeatureStore"),
    "Segment": ("vidpipe.store.labels", "Segment"),
    "event_report": ("vidpipe.malt.events", "event_report"),
    "VideoEvents": ("vidpipe.malt.events", "VideoEvents"),
    "DetectedStart": ("vidpipe.malt.events", "DetectedStart"),
    "VidpipeError": ("vidpipe.core.errors", "VidpipeError"),
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'vidpipe' has no attribute '{name}'")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
