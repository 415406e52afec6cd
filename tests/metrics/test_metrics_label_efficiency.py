"""Label-efficiency rows, the pretraining gain against the seed spread, and the plot, against hand-computed values."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from custom_nets.metrics.label_efficiency import label_efficiency_rows, plot_label_efficiency, pretraining_gain

RESULTS = {
    "random": {3: {0: 0.2, 1: 0.4, 2: 0.3}, 9: {0: 0.6, 1: 0.5, 2: 0.7}},
    "pretrained": {3: {2: 0.5, 0: 0.5, 1: 0.5}, 9: {0: 0.6, 1: 0.6, 2: 0.6}},
}


def test_rows_by_hand() -> None:
    rows = label_efficiency_rows(RESULTS)
    assert [(r["init"], r["labelled_volumes"]) for r in rows] == [
        ("random", 3),
        ("random", 9),
        ("pretrained", 3),
        ("pretrained", 9),
    ]
    assert rows[0]["values"] == [0.2, 0.4, 0.3]  # ordered by seed
    assert rows[0]["mean"] == pytest.approx(0.3) and rows[0]["std"] == pytest.approx(0.1) and rows[0]["trials"] == 3
    assert rows[2]["std"] == 0.0


def test_gain_is_judged_against_the_larger_std_and_paired_by_seed() -> None:
    rows = label_efficiency_rows(RESULTS)
    small = pretraining_gain(rows, 3)
    assert small["gain"] == pytest.approx(0.2) and small["larger_std"] == pytest.approx(0.1) and small["clear"]
    assert small["wins"] == 3 and small["trials"] == 3
    assert small["paired_std"] == pytest.approx(0.1)  # differences 0.3, 0.1, 0.2
    large = pretraining_gain(rows, 9)
    assert large["gain"] == pytest.approx(0.0) and not large["clear"]
    assert large["wins"] == 1 and math.isclose(large["paired_std"], 0.1)  # differences 0.0, 0.1, -0.1
    with pytest.raises(KeyError, match="at 4 labelled volumes"):
        pretraining_gain(rows, 4)


def test_plot_is_written(tmp_path) -> None:
    path = plot_label_efficiency(label_efficiency_rows(RESULTS), tmp_path / "curve.png", title="demo")
    with Image.open(path) as image:
        assert image.size[0] > 200 and image.size[1] > 200
