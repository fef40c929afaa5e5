"""Decoding and two-stream (RGB + optical flow) features; knows nothing of MALT.

Imports only `vidpipe.core` (docs/architecture.md).
"""
