"""The applications: the stages (extract, detect, demo), timelines and the `vidpipe` CLI.

The top layer: it may import every other package (docs/architecture.md).
"""
