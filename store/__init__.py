"""vidpipe's data layer: the feature cache, the labels beside it, importers and exporters of
the field's precomputed layouts. Imports only `vidpipe.core` (docs/architecture.md).
"""
