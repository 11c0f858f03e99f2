"""Bad input to the curvature core raises clear, typed errors."""

import numpy as np
import pytest

from pipeline.curvature import layer_derivatives
from pipeline.errors import BadInputError, NonFiniteLossError
from tests.curvature.cases import CASE_IDS, CASES

CASE = CASES[CASE_IDS.index("cnn_maxpool_relu")]


@pytest.fixture(scope="module")
def model():
    return CASE.model()


def _run(model, x=None, y=None, **kwargs):
    cx, cy = CASE.data()
    options = dict(loss=CASE.loss, from_logits=True)
    options.update(kwargs)
    return layer_derivatives(model, options.pop("layer", "target"), cx if x is None else x, cy if y is None else y, **options)


def test_unknown_layer_lists_layer_names(model):
    with pytest.raises(BadInputError, match=r"layer 'conv9' not found; layers are: .*c1, target, max_pooling2d"):
        _run(model, layer="conv9")


def test_missing_weight_names_the_weights(model):
    with pytest.raises(BadInputError, match=r"layer 'target' \(Conv2D\) has no target weight 'gamma'; its target weights are \['kernel', 'bias'\]"):
        _run(model, weight="gamma")


def test_non_parametric_layer_is_refused(model):
    with pytest.raises(BadInputError, match="is a Flatten, which cannot be a target; target kinds are the convolutions"):
        _run(model, layer=model.layers[-2].name)


@pytest.mark.parametrize("channels", [slice(3, 9), slice(2, 2), slice(0, 4, 2)])
def test_out_channels_out_of_range(model, channels):
    with pytest.raises(BadInputError, match=r"out_channels .* within \[0, 4\)"):
        _run(model, out_channels=channels)


def test_label_shape_mismatch(model):
    x, _ = CASE.data()
    with pytest.raises(BadInputError, match=r"needs labels with 5 values per example"):
        _run(model, y=np.zeros((len(x), 3), "float32"), loss="categorical_crossentropy")


def test_labels_out_of_class_range(model):
    x, _ = CASE.data()
    with pytest.raises(BadInputError, match=r"class labels must lie in \[0, 5\)"):
        _run(model, y=np.full(len(x), 7))


def test_input_shape_mismatch(model):
    with pytest.raises(BadInputError, match=r"expects \(6, 6, 2\)"):
        _run(model, x=np.zeros((6, 5, 5, 2), "float32"))


def test_non_finite_loss(model):
    x, _ = CASE.data()
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(NonFiniteLossError, match=r"(the loss is nan|is not finite)"):
        _run(model, x=x)


def test_unknown_loss_and_engine(model):
    with pytest.raises(BadInputError, match="unknown loss 'hinge'"):
        _run(model, loss="hinge")
    with pytest.raises(BadInputError, match="unknown engine 'fast'"):
        _run(model, engine="fast")
