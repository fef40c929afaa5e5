"""The optical-flow methods vidpipe computes: one registry, no heavy imports.

`FeatureSettings.flow_method`'s type, its validation, the CLI's `--flow` choice and help, the
method's own settings in the settings record, and the estimator `extractors.flow.flow_estimator`
builds all derive from `FLOW_METHODS`, so a name is known everywhere or nowhere. (This module
imports nothing heavy: the CLI reads it to build its options before torch is imported.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vidpipe.core.errors import VidpipeError


@dataclass(frozen=True)
class FlowMethod:
    """One flow method: what the CLI says of it, which estimator computes it and which
    feature settings it reads (those enter the settings record: they change the features)."""
    help: str                  # a few words for `--flow`'s help
    estimator: str | None      # "opencv" (CPU, outside the GIL) | "raft" (model's device) | None: picks one
    settings: tuple[str, ...] = ()   # FeatureSettings fields of this method


FLOW_METHODS: dict[str, FlowMethod] = {
    "auto": FlowMethod("raft on CUDA, dis on a CPU", None),
    "tvl1": FlowMethod("OpenCV TV-L1, the field's standard (CPU, slow)", "opencv"),
    "dis": FlowMethod("OpenCV DIS (fast, CPU)", "opencv", ("dis_preset",)),
    "raft": FlowMethod("torchvision RAFT (GPU)", "raft", ("raft_model", "raft_iterations")),
}

FlowMethodName = Literal[tuple(FLOW_METHODS)]   # FeatureSettings' type: what YAML and --set accept


def flow_method(name: str, estimator: str | None = None) -> FlowMethod:
    """The registered method `name` (of that `estimator` kind, when given); anything else
    is a one-line error listing the names that are."""
    known = [n for n, method in FLOW_METHODS.items() if estimator in (None, method.estimator)]
    if name not in known:
        kind = f" {estimator}" if estimator else ""
        raise VidpipeError(f"flow method '{name}': not a known{kind} flow method; choose one of "
                           f"{', '.join(known)}")
    return FLOW_METHODS[name]


def flow_help() -> str:
    """`--flow`'s help, from the registry."""
    return "Optical flow: " + "; ".join(f"{name} = {method.help}" for name, method in FLOW_METHODS.items()) + "."
