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

PLOTS = ["average_trace.png", "saliency_histogram.png", "pruning.png", "heatmap_0.png", "heatmap_1.png", "heatmap_2.png",
         "validation_scatter.png"]


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
    result = pipeline.load_result(str(finished_store))
    total = sum(float(np.sum(t.saliency)) for t in result.values())
    for name, tensor in result.items():
        trace = float(np.sum(tensor.hessian_diagonal))
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"| {trace:.4e} | {trace / tensor.hessian_diagonal.size:.4e} |" in row
        assert f"| {float(np.sum(tensor.saliency)) / total:.2%} |" in row
        assert tensor.attrs["engine_reason"] in text
    for name in PLOTS:
        assert f"]({name})" in text


def test_global_pruning_fractions_match_a_brute_force_count(finished_store):
    from pipeline.report import pruned_fractions, pruning_thresholds

    result = pipeline.load_result(str(finished_store))
    saliencies = [t.saliency for t in result.values()]
    thresholds = pruning_thresholds(saliencies)
    every = np.sort(np.concatenate([s.ravel() for s in saliencies]))
    pruned = {level: 0 for level in thresholds}
    for saliency in saliencies:
        for level, fraction in pruned_fractions(saliency, thresholds).items():
            pruned[level] += fraction * saliency.size
    for level, count in pruned.items():  # the global threshold prunes that share of all weights (ties included)
        assert count >= level * every.size - 1
        assert count == np.sum(every <= thresholds[level])


def test_status_of_partial_store_names_exactly_the_missing_shards(finished_store, tmp_path, capsys):
    partial = tmp_path / "partial.zarr"
    shutil.copytree(finished_store, partial)
    shutil.rmtree(partial / "manifest" / "t0004-s00001")  # the shared pass's sums are folded and gone: its units rerun
    with pytest.raises(SystemExit) as info:
        main(["status", str(partial), "--json"])
    assert info.value.code == 0
    status = json.loads(capsys.readouterr().out)
    for field in ("store", "complete", "running", "shards_total", "shards_done", "missing", "corrupt", "tensors",
                  "compute_seconds", "elapsed_seconds", "eta_seconds", "validation"):
        assert field in status
    assert status["missing"] == ["t0004-s00001"] and status["corrupt"] == [] and status["shards_done"] == status["shards_total"] - 1
    assert status["complete"] is False and status["eta_seconds"] > 0 and status["units_done"] == 0
    conv = next(t for t in status["tensors"] if t["name"] == "block2_conv1/kernel")
    assert conv["shards_done"] == 1 and conv["shards_total"] == 2 and conv["engine"] == "factored"
    with pytest.raises(SystemExit):
        main(["status", str(partial)])
    assert "missing shards: ['t0004-s00001']" in capsys.readouterr().out


def test_load_result_and_datatree_agree(finished_store):
    from pipeline.results import open_datatree

    result = pipeline.load_result(str(finished_store))
    tree = open_datatree(str(finished_store))
    assert list(result) == result.attrs["targets"] and len(result) == 12
    for name, tensor in result.items():
        node = tree[f"params/{name}"]
        assert tensor.dims == node["hessian_diagonal"].dims
        np.testing.assert_array_equal(node["hessian_diagonal"].values, tensor.hessian_diagonal)
        np.testing.assert_array_equal(node["channel_trace"].values, tensor.channel_trace)
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

    from pipeline.report import contents

    for _, _, fig in contents(ResultStore.open(str(finished_store), mode="r"))[1]:
        boxes = _text_boxes(fig)
        assert len(boxes) >= 5
        for i, (a, box_a) in enumerate(boxes):
            for b, box_b in boxes[i + 1 :]:
                assert not box_a.overlaps(box_b), f"{a!r} overlaps {b!r} in {fig.texts or fig.axes[0].get_title()!r}"
        plt.close(fig)
