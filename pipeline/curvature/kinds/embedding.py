"""Embedding as a target kind: z[n, s] = E[token[n, s]], so row v of E moves z only where token v occurs.

Its patches are the tokens' one-hot codes, held as the tokens (``OneHotPatches``): a row whose token
does not occur in the data has zero gradient and zero curvature, and costs no work.
"""

from __future__ import annotations

import tensorflow as tf

from pipeline.curvature.kinds.base import LayerKind, Stage, TargetWeight, shape_of
from pipeline.curvature.patches import OneHotPatches


class EmbeddingStage(Stage):
    """z = E[tokens]; the tokens are the stage input."""

    def __init__(self, layer):
        weights = {"embeddings": TargetWeight("embeddings", shape_of(layer.embeddings), (0, 1), 1, 1, ("token", "out_channel"),
                                              one_hot=True)}
        super().__init__(layer, "", weights)

    def z(self, u):
        return tf.cast(tf.gather(self.layer.embeddings, tf.cast(u, tf.int32)), self.layer.compute_dtype)

    def patches(self, weight_name, u):
        tokens = tf.reshape(tf.cast(u, tf.int32), (tf.shape(u)[0], -1))
        return OneHotPatches(tokens, self.weights["embeddings"].shape[0], tf.as_dtype(self.layer.compute_dtype))


def embedding_kind(layer) -> LayerKind:
    return LayerKind(layer, (EmbeddingStage(layer),), activated=False)
