"""Streamed data sources: the same examples whatever the source, only a block's chunks read, bad data refused."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import zarr

from pipeline.coordinator import run
from pipeline.data import open_data
from pipeline.losses import get_loss
from pipeline.store import ResultStore
from tests.stores import assert_same_results
from tests.conftest import tiny_config, tiny_raw, write_config

LOSS = get_loss("sparse_categorical_crossentropy")
CLASSES = ("cat", "dog", "emu")


def _digits_arrays():
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images[:96] / 16.0).astype("float32")[..., None], digits.target[:96].astype("int64")


@pytest.fixture(scope="module")
def digit_sources(tmp_path_factory):
    """The same 96 digits as .npz and as a Zarr group chunked by 16 examples."""
    root = tmp_path_factory.mktemp("digits")
    x, y = _digits_arrays()
    np.savez(root / "d.npz", x=x, y=y)
    group = zarr.open_group(str(root / "d.zarr"), mode="w")
    group.create_array("x", data=x, chunks=(16, 8, 8, 1))
    group.create_array("y", data=y, chunks=(16,))
    return root


def test_npz_and_zarr_give_bit_identical_stores(digit_sources, tmp_path):
    stores = []
    for source in ("npz", "zarr"):
        out = tmp_path / f"{source}.zarr"
        data = {"source": source, "path": str(digit_sources / f"d.{source}"), "batch_size": 16}
        run(tiny_config(out, data=data, compute={"example_block": 32}, cluster={"executor": "local"},
                        validation={"samples": 0}), live=False)
        stores.append(out)
    assert ResultStore.open(str(stores[0]), mode="r").attrs["units"] == 3
    assert_same_results(*stores)


def test_zarr_source_reads_only_the_chunks_of_its_block(digit_sources, tmp_path):
    import shutil

    copy = tmp_path / "d.zarr"
    shutil.copytree(digit_sources / "d.zarr", copy)
    for chunk in ("0", "1", "4", "5"):  # examples 0-31 and 64-95 become unreadable
        (copy / "x" / "c" / chunk / "0" / "0" / "0").write_bytes(b"not a chunk")
    source = open_data(tiny_config(tmp_path / "s.zarr", data={"source": "zarr", "path": str(copy)}).data, (8, 8, 1), 10, LOSS)
    x, y = source.read(32, 64)
    np.testing.assert_array_equal(x, _digits_arrays()[0][32:64])
    with pytest.raises(Exception):
        source.read(0, 16)


def _write_images(root, count=4, size=(10, 12)):
    """PNG and JPEG files in class folders, with names whose sorted order differs from creation order."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for k in range(count):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            suffix = "png" if k % 2 == 0 else "jpg"
            keras.utils.save_img(str(root / name / f"img_{(7 * k) % count}_{label}.{suffix}"), pixels)
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return _write_images(tmp_path_factory.mktemp("images") / "train")


def _keras_reference(folder, size):
    dataset = keras.utils.image_dataset_from_directory(str(folder), image_size=size, shuffle=False, batch_size=None,
                                                       interpolation="bilinear")
    xs, ys = zip(*[(x.numpy(), int(y)) for x, y in dataset])
    return np.stack(xs), np.array(ys)


def test_image_folder_matches_keras_image_dataset_from_directory(image_folder, tmp_path):
    config = tiny_config(tmp_path / "s.zarr", data={"source": "images", "path": str(image_folder), "preprocess": "none"})
    source = open_data(config.data, (8, 8, 3), 3, LOSS)
    x, y = source.read(0, source.examples)
    expected_x, expected_y = _keras_reference(image_folder, (8, 8))
    np.testing.assert_array_equal(y, expected_y)
    np.testing.assert_allclose(x, expected_x, rtol=0, atol=1e-4)
    part_x, part_y = source.read(5, 9)
    np.testing.assert_array_equal(part_x, x[5:9])
    np.testing.assert_array_equal(part_y, y[5:9])
    scaled = open_data(tiny_config(tmp_path / "s.zarr", data={"source": "images", "path": str(image_folder),
                                                               "preprocess": "scale"}).data, (8, 8, 3), 3, LOSS)
    np.testing.assert_allclose(scaled.read(0, 3)[0], x[:3] / 255.0, rtol=1e-6)
    vgg = open_data(tiny_config(tmp_path / "s.zarr", data={"source": "images", "path": str(image_folder),
                                                            "preprocess": "vgg16"}).data, (8, 8, 3), 3, LOSS)
    np.testing.assert_allclose(vgg.read(0, 3)[0], keras.applications.vgg16.preprocess_input(x[:3].copy()), rtol=1e-6)


def _write_tfrecords(folder, target):
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    labels = [CLASSES.index(p.parent.name) for p in files]
    halves = [(files[: len(files) // 2], labels[: len(files) // 2]), (files[len(files) // 2 :], labels[len(files) // 2 :])]
    for index, (part, part_labels) in enumerate(halves):
        with tf.io.TFRecordWriter(str(target / f"part-{index}.tfrecord")) as writer:
            for path, label in zip(part, part_labels):
                feature = {
                    "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[path.read_bytes()])),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                }
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


def test_tfrecords_give_the_image_folder_examples(image_folder, tmp_path):
    _write_tfrecords(image_folder, tmp_path)
    records = open_data(tiny_config(tmp_path / "s.zarr", data={"source": "tfrecord", "path": str(tmp_path / "*.tfrecord")}).data,
                        (8, 8, 3), 3, LOSS)
    images = open_data(tiny_config(tmp_path / "s.zarr", data={"source": "images", "path": str(image_folder)}).data,
                       (8, 8, 3), 3, LOSS)
    assert records.examples == images.examples == 12
    for a, b in zip(records.read(3, 10), images.read(3, 10)):
        np.testing.assert_array_equal(a, b)


def _image_model(tmp_path, classes=3):
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
    keras.Model(inp, keras.layers.Dense(classes)(keras.layers.Flatten()(h))).save(tmp_path / "m.keras")
    return {"source": "keras_file", "path": str(tmp_path / "m.keras"), "builder": None}


def test_run_on_images_with_units_validates(image_folder, tmp_path):
    out = tmp_path / "s.zarr"
    config = tiny_config(out, model=_image_model(tmp_path), target={"layer": "conv"}, loss={"from_logits": True},
                         data={"source": "images", "path": str(image_folder), "preprocess": "scale", "batch_size": 4},
                         compute={"example_block": 4, "shard_size": 2}, cluster={"executor": "local"}, validation={"samples": 4})
    result = run(config, live=False)
    assert result.passed and len(result.computed) == 3  # factored: one channel group x 3 blocks of 4 images


@pytest.mark.parametrize("problem,expected", [
    ("missing_array", "lacks arrays ['y']"),
    ("wrong_shape", "inputs have shape (6, 6, 1) per example"),
    ("labels_out_of_range", "class labels must lie in [0, 10)"),
    ("unreadable_image", "is not a readable PNG/JPEG/GIF/BMP image"),
    ("too_many_classes", "has 11 class folders but the model has 10 outputs"),
])
def test_bad_data_exits_2_and_writes_nothing(tmp_path, capsys, problem, expected):
    from pipeline.cli import main

    data_path = tmp_path / "data.zarr"
    data = {"source": "zarr", "path": str(data_path)}
    x, y = _digits_arrays()
    if problem in ("missing_array", "wrong_shape", "labels_out_of_range"):
        group = zarr.open_group(str(data_path), mode="w")
        group.create_array("x", data=x[:, :6, :6] if problem == "wrong_shape" else x)
        if problem != "missing_array":
            group.create_array("y", data=y + 10 * (problem == "labels_out_of_range"))
    else:
        folder = tmp_path / "images"
        for label in range(11 if problem == "too_many_classes" else 2):
            (folder / f"c{label:02d}").mkdir(parents=True)
            keras.utils.save_img(str(folder / f"c{label:02d}" / "a.png"), np.zeros((8, 8, 1), np.uint8), scale=False)
        if problem == "unreadable_image":
            (folder / "c00" / "b.png").write_bytes(b"this is not a PNG")
        data = {"source": "images", "path": str(folder)}
    out = tmp_path / "s.zarr"
    with pytest.raises(SystemExit) as info:
        main(["run", write_config(tmp_path / "c.yaml", tiny_raw(out, data=data, cluster={"executor": "local"}))])
    err = capsys.readouterr().err
    assert info.value.code == 2 and expected in err, err
    assert "Traceback" not in err and not out.exists()
