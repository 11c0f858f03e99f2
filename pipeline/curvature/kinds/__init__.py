"""Target kinds: each supported layer type as a chain of affine stages (``base.LayerKind``).

Which kind a layer has is one field of its facts in ``pipeline.curvature.layer_facts``.
"""

from pipeline.curvature.kinds.base import LayerKind, Stage, TargetWeight

__all__ = ["LayerKind", "Stage", "TargetWeight"]
