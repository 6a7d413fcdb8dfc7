"""Distributed normalization-study sweeps for BDD100K drivable-area segmentation.

The flow of a sweep: `cli` -> `spec` (validate; the grid as typed trials) -> `execution` (Ray Tune trials,
each a Ray Train run) -> `train` (the loop every rank runs), using `data`, `models` and `checkpoints`;
`tracking` holds every MLflow call. `inference` scores checkpoints and ensembles; `report` writes the
study's figure and tables. The README's Layout section maps the files.
"""

__version__ = "0.1.0"
