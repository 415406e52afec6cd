"""The README's main command path: the embedded demo end to end on a one-item-per-class corpus, one epoch."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from custom_nets.pretraining_demo import run_demo


@pytest.mark.slow
def test_demo_writes_report_plot_and_embeddings(tmp_path: Path) -> None:
    report = run_demo(tmp_path, epochs=1, num_per_class=1, eval_per_class=1, num_workers=0)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["iterations"] == report["iterations"] > 0
    assert {"intra", "inter", "mask", "total"} <= set(saved["loss_terms"][0])
    for phase in ("random_init", "pretrained"):
        for kind in ("image", "volume"):
            assert 0.0 <= saved[phase][kind]["nmi"] <= 1.0 and saved[phase][kind]["count"] == 4
    assert (tmp_path / "embeddings.png").stat().st_size > 0
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "model.json").is_file()
    random_rows = np.load(tmp_path / "embeddings_random" / "embeddings.npy")
    pretrained_rows = np.load(tmp_path / "embeddings_pretrained" / "embeddings.npy")
    assert random_rows.shape == pretrained_rows.shape == (8, 128)
    assert not np.allclose(random_rows, pretrained_rows)
    with open(tmp_path / "embeddings_pretrained" / "embeddings.csv", newline="") as handle:
        sources = [Path(record["source_image"]) for record in csv.DictReader(handle)]
    assert all((tmp_path / "eval_corpus") in source.parents for source in sources)  # scored on held-out items only
