"""AGGREGATES: the names of the ways averaging reduces the values peers offer, as the configs of the
trainers (``dmoe.lm.config``) and of the nodes (``dmoe.node.config``) accept them. Torch-free, so the CLI
builds its options without importing torch.

- ``mean``: the plain (weighted) mean;
- ``centered-clip``: CenteredClip, a robust aggregate (:func:`dmoe.core.robust.centered_clip`).
"""

AGGREGATES = ("mean", "centered-clip")
