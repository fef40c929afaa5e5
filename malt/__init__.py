"""MALT: model, data windows, losses, metrics, training, evaluation, streaming inference.

Knows nothing of video files: reads features and labels through `vidpipe.store`.
Imports only `vidpipe.core` and `vidpipe.store` (docs/architecture.md).
"""
