"""Models: backbones, heads and the norm factory, all in plain torch.

- ``catalog``: names the spec may use (backbones, heads, output strides) and the norm-string parser;
  torch-free, so the spec validator can import it without torch.
- ``norms``: ``make_norm(spec, C)``, the one factory every layer asks for its norm (incl. a CPU SyncBN,
  FrozenBN and IBN), and ``convert_norms(model, spec)`` for a built model.
- ``evalnorm``: EvalNorm (online estimation in training, offline ``calibrate``).
- ``layers``: the conv factory (``StdConv2d`` for Weight Standardization), conv-norm-ReLU, weight init.
- ``resnet``: ResNet-18/50 with torchvision's key names and a dilated output stride of 8 or 16.
- ``deeplab``: the DeepLabv3+ head (ASPP + decoder).
- ``pretrained``: loading a torchvision-layout state_dict from any fsspec URI.
- ``build``: ``build_model(...)`` -> ``SegmentationModel`` (``.backbone`` + ``.head``).

Import the submodules directly; this package imports nothing so that ``catalog`` stays torch-free.
"""
