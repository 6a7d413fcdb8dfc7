"""BDD100K drivable-area data: layout, synthetic scenes, tar shards and streaming loaders.

Modules (import what you need; this package imports nothing heavy itself):
    storage     fsspec URLs (s3://, gs://, file://, local paths) -> filesystem, URL joins
    layout      the official BDD100K directory layout, class names, sample listing
    synth       procedural road scenes written in that layout
    shards      pack the layout into tar shards with a manifest; read a manifest
    transforms  training augmentation and validation preprocessing
    stream      per-rank, per-worker streaming loaders over the shards
"""
