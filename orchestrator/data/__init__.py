"""BDD100K drivable-area data: layout, synthetic scenes, tar shards and streaming loaders.

Modules (import what you need; this package imports nothing heavy itself; URLs become filesystems in
orchestrator/storage.py, which the models and checkpoints use too):
    layout      the official BDD100K directory layout: images, where each label format lives, class names
    labels      every official drivable-label format (masks, colormaps, RLE and polygon JSON, 2018 ids) read
                as the current masks' class ids
    synth       procedural road scenes written in that layout
    shards      pack the layout into tar shards with a manifest; read a manifest
    verify      re-read packed shards against their manifests
    resample    training copies per sample from per-image scores
    transforms  training augmentation and validation preprocessing
    stream      per-rank, per-worker streaming loaders over the shards
"""
