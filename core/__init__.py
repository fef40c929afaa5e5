"""vidpipe's kernel: errors, atomic writes, devices, the config loader, settings comparison.

The bottom layer: it imports nothing else of vidpipe (docs/architecture.md).
"""
