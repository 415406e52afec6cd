"""Write the embeddings an evaluator produces as ``.npy`` arrays plus an index CSV."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

from custom_nets.atomic_files import atomic_path

__all__ = ["EmbeddingWriter"]


def _as_list(value: object, batch_size: int) -> list:
    if isinstance(value, torch.Tensor):
        return value.reshape(batch_size, -1)[:, 0].tolist() if value.numel() else [None] * batch_size
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value] * batch_size


class EmbeddingWriter:
    """Collect ``engine.state.output["pred"]["embedding"]`` ``(B, d)`` and write, at completion:

    - ``<output_dir>/embeddings.npy``: ``(M, d)`` float32, one row per item in loader order;
    - ``<output_dir>/embeddings.csv``: ``row`` plus the batch metadata listed in ``index_keys`` (e.g. ``source_image``,
      ``kind``, ``class_label``) for each row;
    - ``<output_dir>/slice_embeddings/<row>.npy``: ``(N_valid, d)`` per volume when the inferer returns per-slice
      embeddings.

    Files are written to temporary names and renamed, so an interrupted run never leaves half-written outputs.
    """

    def __init__(self, output_dir: str | os.PathLike, index_keys: Sequence[str] = ("source_image", "kind")) -> None:
        self.output_dir = Path(output_dir)
        self.index_keys = tuple(index_keys)
        self._rows: list[np.ndarray] = []
        self._index: list[dict[str, object]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def reset(self, engine: Engine) -> None:
        self._rows.clear()
        self._index.clear()

    def collect(self, engine: Engine) -> None:
        pred = engine.state.output["pred"]
        embedding = pred["embedding"].detach().float().cpu().numpy()
        batch = engine.state.batch
        columns = {key: _as_list(batch.get(key), len(embedding)) for key in self.index_keys}
        for position, row in enumerate(embedding):
            record = {"row": len(self._rows)}
            record.update({key: columns[key][position] for key in self.index_keys})
            self._rows.append(row)
            self._index.append(record)
            if "slice_embeddings" in pred:
                valid = batch.get("slice_valid")
                tokens = pred["slice_embeddings"][position]
                if valid is not None:
                    tokens = tokens[torch.as_tensor(valid[position]).bool().to(tokens.device)]
                self._save_array(self.output_dir / "slice_embeddings" / f"{record['row']}.npy", tokens)

    def _save_array(self, path: Path, array: torch.Tensor | np.ndarray) -> None:
        with atomic_path(path) as temporary:
            np.save(temporary, np.asarray(torch.as_tensor(array).detach().float().cpu()))

    def write(self, engine: Engine) -> None:
        if not self._rows:
            raise RuntimeError("no embedding was produced: the inference datalist is empty.")
        self._save_array(self.output_dir / "embeddings.npy", np.stack(self._rows))
        with atomic_path(self.output_dir / "embeddings.csv") as temporary, open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["row", *self.index_keys])
            writer.writeheader()
            writer.writerows(self._index)
