"""Models: backbones, heads and the norm factory, all in plain torch.

- ``catalog``: one record per backbone (its module, feature channels, output strides, IBN support,
  published parameter count), the heads, and the norm-string parser; torch-free, so the spec validator
  can import it without torch.
- ``norms``: ``make_norm(spec, C)``, the one factory every layer asks for its norm (incl. a CPU SyncBN,
  FrozenBN and IBN), ``make_act(spec, C, act)`` for its activations (a norm may own them: FRN's TLU), and
  ``convert_norms(model, spec)`` for a built model.
- ``evalnorm``: EvalNorm (online estimation in training, offline ``calibrate``); ``ghost_bn``,
  ``batch_renorm``, ``frn``: Ghost BN, Batch Renormalization, FRN with its TLU.
- ``layers``: the conv factory, which alone decides Weight Standardization (``StdConv2d``), conv-norm-act,
  separable convs, the classifier, weight init.
- backbones, one function per catalog name: ``resnet`` (ResNet-18/50/101/152 and ResNet-D), ``xception``,
  ``drn``, ``wider_resnet``; ``enet`` is a whole model with its own head.
- heads: ``deeplab`` (DeepLabv3+ and DeepLabv3), ``fcn``.
- ``pretrained``: weights from any fsspec URI (.pth or safetensors, checkpoints unwrapped).
- ``build``: ``build_model(...)`` -> ``SegmentationModel`` (``.backbone`` + ``.head``).

Import the submodules directly; this package imports nothing so that ``catalog`` stays torch-free.
"""
