"""Train the default run's model: the ``digits_vgg`` CNN on scikit-learn's 8x8 digits, seeded and deterministic.

Writes ``configs/models/digits_cnn.keras`` (the model ``make run`` differentiates) and prints its test
accuracy. The first 1,437 digits (80 %) train it; the last 360 are held out.

    .venv/bin/python scripts/train_digits_cnn.py [--out configs/models/digits_cnn.keras]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

TRAIN = 1437


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype("float32")[..., None], data.target.astype("int64")


def train(seed: int = 0, epochs: int = 20):
    """The trained model and its held-out accuracy."""
    import keras
    import tensorflow as tf

    from pipeline.model import build_model

    tf.config.experimental.enable_op_determinism()
    x, y = digits()
    model = build_model("digits_vgg", seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x[:TRAIN], y[:TRAIN], batch_size=64, epochs=epochs, shuffle=True, verbose=0)
    accuracy = float(np.mean(np.argmax(model.predict(x[TRAIN:], verbose=0), axis=1) == y[TRAIN:]))
    return model, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "configs", "models", "digits_cnn.keras"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model, accuracy = train(args.seed)
    from pipeline.model import build_model

    bare = build_model("digits_vgg", seed=args.seed)  # the same architecture without the optimizer's state
    bare.set_weights(model.get_weights())
    bare.save(args.out)
    print(f"wrote {os.path.normpath(args.out)}: held-out accuracy {accuracy:.4f} on {len(digits()[1]) - TRAIN} digits")


if __name__ == "__main__":
    main()
