"""Data sources. Each reads any range of examples on request, so no worker holds the whole data set.

``synthetic`` (seeded normal inputs), ``digits`` (scikit-learn's 8x8 digits), ``npz`` (arrays ``x``, ``y``),
``zarr`` (a Zarr group with arrays ``x``, ``y``, local or any fsspec URL; a read touches only the
chunks of its range), ``images`` (a folder of class subfolders, labels = sorted subfolder names as
``keras.utils.image_dataset_from_directory`` does) and ``tfrecord`` (files matching a glob, features
``image`` = encoded PNG/JPEG and ``label`` = int64). Examples keep one fixed order: sorted classes,
then sorted file names; sorted TFRecord files, then record order.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.config import DataConfig
from pipeline.errors import BadInputError
from pipeline.losses import Loss

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")


def _labels_for(loss: Loss, class_ids: np.ndarray, classes: int) -> np.ndarray:
    if loss.name == "sparse_categorical_crossentropy":
        return class_ids.astype(np.int64)
    return np.eye(classes, dtype=np.float32)[class_ids]


class DataSource:
    """``examples`` examples, read by range; subclasses implement ``_read``."""

    examples: int

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Examples ``start:stop`` as (float32 inputs, labels)."""
        x, y = self._read(start, min(stop, self.examples))
        return np.asarray(x, np.float32), np.asarray(y)

    def _read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def blocks(self, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Consecutive ranges of ``size`` examples, in order."""
        for start in range(0, self.examples, size):
            yield self.read(start, start + size)


class ArraySource(DataSource):
    """Examples generated or loaded as arrays (synthetic, digits, npz)."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y
        self.examples = len(x)

    def _read(self, start, stop):
        return self.x[start:stop], self.y[start:stop]


class ZarrSource(DataSource):
    """A Zarr group with arrays ``x`` and ``y``; each read fetches only the chunks of its range."""

    def __init__(self, path: str, storage_options: dict, limit: int | None):
        import zarr

        options = {"storage_options": storage_options} if "://" in path and not path.startswith("file://") else {}
        try:
            group = zarr.open_group(path.removeprefix("file://"), mode="r", **options)
        except Exception as exc:  # noqa: BLE001 - missing, unreachable or not a group: all bad input
            raise BadInputError(f"data.path {path!r} is not a readable Zarr group: {type(exc).__name__}: {exc}") from None
        missing = [name for name in ("x", "y") if name not in group]
        if missing:
            raise BadInputError(f"Zarr data set {path!r} lacks arrays {missing}; it has {sorted(group.array_keys())}")
        self.x, self.y = group["x"], group["y"]
        if self.x.shape[0] != self.y.shape[0]:
            raise BadInputError(f"Zarr data set {path!r}: x has {self.x.shape[0]} examples but y has {self.y.shape[0]}")
        self.examples = self.x.shape[0] if limit is None else min(limit, self.x.shape[0])

    def _read(self, start, stop):
        return self.x[start:stop], self.y[start:stop]


def _preprocess(images: np.ndarray, preprocess: str) -> np.ndarray:
    if preprocess == "none":
        return images
    if preprocess == "scale":
        return images / 255.0
    import keras

    return getattr(keras.applications, preprocess).preprocess_input(images)


def _decode(encoded: bytes, channels: int, size: tuple[int, int], where: str) -> np.ndarray:
    import tensorflow as tf

    try:
        image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    except tf.errors.InvalidArgumentError:
        raise BadInputError(f"{where} is not a readable PNG/JPEG/GIF/BMP image") from None
    return tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear").numpy()


class ImageFolderSource(DataSource):
    """A folder of class subfolders; labels are the sorted subfolder names' indices."""

    def __init__(self, root: str, size: tuple[int, int], channels: int, preprocess: str, loss: Loss, classes: int, limit: int | None):
        if not Path(root).is_dir():
            raise BadInputError(f"data.path {root!r} is not a folder of class subfolders")
        names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        if not names:
            raise BadInputError(f"data.path {root!r} has no class subfolders")
        if len(names) > classes:
            raise BadInputError(f"{root!r} has {len(names)} class folders but the model has {classes} outputs")
        self.files, ids = [], []
        for index, name in enumerate(names):
            found = sorted(
                os.path.join(folder, f) for folder, _, files in os.walk(os.path.join(root, name)) for f in files
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
            self.files += found
            ids += [index] * len(found)
        self.labels = _labels_for(loss, np.array(ids, np.int64), classes)
        self.size, self.channels, self.preprocess = size, channels, preprocess
        self.class_names = names
        self.examples = len(self.files) if limit is None else min(limit, len(self.files))

    def _read(self, start, stop):
        images = [_decode(Path(f).read_bytes(), self.channels, self.size, f) for f in self.files[start:stop]]
        batch = np.stack(images) if images else np.zeros((0, *self.size, self.channels), np.float32)
        return _preprocess(batch, self.preprocess), self.labels[start:stop]


class TFRecordSource(DataSource):
    """TFRecord files matching a glob, in sorted order; features ``image`` (encoded) and ``label`` (int64)."""

    def __init__(self, pattern: str, size: tuple[int, int], channels: int, preprocess: str, loss: Loss, classes: int,
                 limit: int | None):
        import tensorflow as tf

        self.files = sorted(glob.glob(pattern))
        if not self.files:
            raise BadInputError(f"data.path {pattern!r} matches no TFRecord files")
        self.features = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64)}
        try:
            count = sum(1 for _ in tf.data.TFRecordDataset(self.files))
        except tf.errors.DataLossError as exc:
            raise BadInputError(f"{pattern!r}: not a TFRecord file ({exc.message.splitlines()[0]})") from None
        self.size, self.channels, self.preprocess, self.loss, self.classes = size, channels, preprocess, loss, classes
        self.examples = count if limit is None else min(limit, count)

    def _read(self, start, stop):
        import tensorflow as tf

        images, ids = [], []
        for k, record in enumerate(tf.data.TFRecordDataset(self.files).skip(start).take(stop - start)):
            try:
                parsed = tf.io.parse_single_example(record, self.features)
            except tf.errors.InvalidArgumentError as exc:
                raise BadInputError(f"TFRecord example {start + k} lacks features 'image' (bytes) and 'label' (int64): "
                                    f"{exc.message.splitlines()[0]}") from None
            images.append(_decode(parsed["image"].numpy(), self.channels, self.size, f"TFRecord example {start + k}"))
            ids.append(int(parsed["label"]))
        batch = np.stack(images) if images else np.zeros((0, *self.size, self.channels), np.float32)
        labels = np.array(ids, np.int64)
        if len(labels) and (labels.min() < 0 or labels.max() >= self.classes):
            raise BadInputError(f"TFRecord labels must lie in [0, {self.classes}), got [{labels.min()}, {labels.max()}]")
        return _preprocess(batch, self.preprocess), _labels_for(self.loss, labels, self.classes)


def _digits(input_shape: tuple, loss: Loss, classes: int) -> ArraySource:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    if int(np.prod(input_shape)) != 64:
        raise BadInputError(f"digits are 8x8 images (64 values) but the model expects inputs of shape {input_shape}")
    if classes != 10:
        raise BadInputError(f"digits have 10 classes but the model has {classes} outputs")
    return ArraySource(x.reshape((len(x), *input_shape)), _labels_for(loss, digits.target, classes))


def _npz(path: str) -> ArraySource:
    if not Path(path).is_file():
        raise BadInputError(f"data file {path!r} does not exist")
    with np.load(path) as arrays:
        missing = {"x", "y"} - set(arrays.files)
        if missing:
            raise BadInputError(f"data file {path!r} lacks arrays {sorted(missing)}; it has {arrays.files}")
        return ArraySource(arrays["x"].astype(np.float32), arrays["y"])


def _synthetic(config: DataConfig, input_shape: tuple, loss: Loss, classes: int) -> ArraySource:
    rng = np.random.default_rng(config.seed)
    n = config.num_examples or 64
    x = rng.normal(size=(n, *input_shape)).astype(np.float32)
    if loss.name == "mse":
        return ArraySource(x, rng.normal(size=(n, classes)).astype(np.float32))
    return ArraySource(x, _labels_for(loss, rng.integers(0, classes, n), classes))


def open_data(config: DataConfig, input_shape: tuple, output_classes: int, loss: Loss, storage_options: dict | None = None) -> DataSource:
    """The configured source for the model's input shape and output width, limited to ``num_examples``."""
    limit = config.num_examples
    if config.source in ("images", "tfrecord"):
        if len(input_shape) != 3:
            raise BadInputError(f"data.source {config.source!r} needs a model with image inputs (H, W, C); it has {input_shape}")
        size = tuple(config.image_size or input_shape[:2])
        if size != tuple(input_shape[:2]):
            raise BadInputError(f"data.image_size {list(size)} differs from the model's input size {list(input_shape[:2])}")
        kind = ImageFolderSource if config.source == "images" else TFRecordSource
        return kind(config.path, size, input_shape[2], config.preprocess, loss, output_classes, limit)
    if config.source == "zarr":
        return ZarrSource(config.path, storage_options or {}, limit)
    if config.source == "synthetic":
        return _synthetic(config, input_shape, loss, output_classes)
    source = _digits(input_shape, loss, output_classes) if config.source == "digits" else _npz(config.path)
    if limit is not None:
        source = ArraySource(source.x[:limit], source.y[:limit])
    return source
