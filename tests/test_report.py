"""Reports and status: every file written, valid images, numbers that match the store."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import pipeline
from pipeline.cli import main
from pipeline.report import write_report
from pipeline.store import ResultStore

PLOTS = ["diagonal_heatmap.png", "channel_trace.png", "diagonal_histogram.png", "gradient_histogram.png", "validation_scatter.png"]


def test_report_writes_every_plot_and_matching_markdown(finished_store, tmp_path):
    store = ResultStore.open(str(finished_store), mode="r")
    written = write_report(store, str(tmp_path / "report"))
    assert sorted(p.split("/")[-1] for p in written) == sorted(PLOTS + ["report.md"])
    for name in PLOTS:
        path = tmp_path / "report" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.size[0] >= 600 and image.size[1] >= 400
            pixels = np.asarray(image.convert("L"))
            assert pixels.std() > 5  # something was drawn
    text = (tmp_path / "report" / "report.md").read_text()
    validation = store.attrs["validation"]
    assert f"max relative error {validation['max_rel_error']:.3e}" in text
    assert f"passed **{validation['passed']}**" in text
    assert f"**{store.attrs['engine']}**" in text and store.attrs["engine_reason"] in text
    for entry in validation["entries"]:
        assert f"{entry['hessian_diagonal']:.6e}" in text and f"{entry['hessian_diagonal_fd']:.6e}" in text
    for name in PLOTS:
        assert f"]({name})" in text


def test_status_of_partial_store_names_exactly_the_missing_shards(finished_store, tmp_path, capsys):
    partial = tmp_path / "partial.zarr"
    shutil.copytree(finished_store, partial)
    shutil.rmtree(partial / "manifest" / "shard-00001")  # the group's sums are folded and gone: its units rerun
    with pytest.raises(SystemExit) as info:
        main(["status", str(partial), "--json"])
    assert info.value.code == 0
    status = json.loads(capsys.readouterr().out)
    for field in ("store", "complete", "running", "shards_total", "shards_done", "missing", "corrupt", "engine",
                  "engine_reason", "compute_seconds", "elapsed_seconds", "eta_seconds", "validation"):
        assert field in status
    assert status["missing"] == [1] and status["corrupt"] == [] and status["shards_done"] == 1
    assert status["complete"] is False and status["eta_seconds"] > 0 and status["units_done"] == 0
    with pytest.raises(SystemExit):
        main(["status", str(partial)])
    assert "missing shards: [1]" in capsys.readouterr().out


def test_load_result_and_xarray_agree(finished_store):
    from pipeline.results import open_dataset

    result = pipeline.load_result(str(finished_store))
    ds = open_dataset(str(finished_store))
    assert result.dims == ds["hessian_diagonal"].dims == ("kh", "kw", "in_channel", "out_channel")
    np.testing.assert_array_equal(ds["hessian_diagonal"].values, result.hessian_diagonal)
    assert result.attrs["complete"] is True


def _text_boxes(fig):
    """Extents of every visible, non-empty text in ``fig`` after drawing."""
    import matplotlib.text

    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    texts = [*fig.texts, *([fig._suptitle] if fig._suptitle else [])]
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        texts += [label for axis in (ax.xaxis, ax.yaxis) for tick in axis._update_ticks() for label in (tick.label1, tick.label2)]
        legend = ax.get_legend()
        texts += legend.get_texts() if legend else []
    boxes = []
    for text in dict.fromkeys(texts):  # each artist once
        assert isinstance(text, matplotlib.text.Text)
        if text.get_visible() and text.get_text().strip():
            box = text.get_window_extent(renderer)
            if box.width > 0 and box.height > 0:
                boxes.append((text.get_text(), box))
    return boxes


def test_no_text_in_any_plot_overlaps_another(finished_store):
    import matplotlib.pyplot as plt

    from pipeline.report import figures

    for fig in figures(ResultStore.open(str(finished_store), mode="r")):
        boxes = _text_boxes(fig)
        assert len(boxes) >= 5
        for i, (a, box_a) in enumerate(boxes):
            for b, box_b in boxes[i + 1 :]:
                assert not box_a.overlaps(box_b), f"{a!r} overlaps {b!r} in {fig.texts or fig.axes[0].get_title()!r}"
        plt.close(fig)
