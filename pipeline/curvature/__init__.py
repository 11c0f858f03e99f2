"""The math of hessdiag: exact derivatives of TensorFlow models, no Ray, no storage."""

from pipeline.curvature.autodiff import (
    FlatHessian,
    flat_hessian,
    hessian_diagonal,
    hvp,
    per_example_hessians,
    rowwise_hessian_diagonal,
)
from pipeline.curvature.finite_diff import FiniteDifferences, finite_difference_derivatives
from pipeline.curvature.precision import float64_clone
from pipeline.curvature.engines import ENGINES as ENGINE_FLAGS, EngineChoice, choose_engine
from pipeline.curvature.layer import ENGINES, Derivatives, LayerCurvature, TensorCurvature, batches_of, layer_derivatives
from pipeline.curvature.suffix import SuffixCheck, check_suffix

__all__ = [
    "ENGINES",
    "ENGINE_FLAGS",
    "Derivatives",
    "EngineChoice",
    "FiniteDifferences",
    "FlatHessian",
    "LayerCurvature",
    "SuffixCheck",
    "TensorCurvature",
    "batches_of",
    "check_suffix",
    "choose_engine",
    "finite_difference_derivatives",
    "flat_hessian",
    "float64_clone",
    "hessian_diagonal",
    "hvp",
    "layer_derivatives",
    "per_example_hessians",
    "rowwise_hessian_diagonal",
]
