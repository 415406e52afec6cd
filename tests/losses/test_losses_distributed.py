"""Two gloo CPU processes give the same losses, gradients and k-means centroids as one process with both batches."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp


@pytest.mark.flaky(reruns=1, only_rerun=["SIGABRT", "Signal 6"])  # a rare gloo process abort, see pyproject.toml
@pytest.mark.slow
def test_two_processes_match_one_process_with_the_doubled_batch(tmp_path, monkeypatch, bundle_checks):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    worker = importlib.import_module("losses_ddp_worker")
    mp.spawn(worker.run, args=(2, bundle_checks.free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    single = worker.compute(rank=0, world_size=1)

    codes = torch.split(single["sinkhorn_codes"], worker.UNEVEN_SPLIT)
    for rank, rank_result in enumerate(ranks):
        torch.testing.assert_close(rank_result["sinkhorn_codes"], codes[rank], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(rank_result["swav_loss"], single["swav_loss"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rank_result["deepcluster_loss"], single["deepcluster_loss"], atol=1e-5, rtol=1e-5)
        for key in ("swav_grads", "deepcluster_grads"):
            assert rank_result[key].keys() == single[key].keys()
            for name, gradient in single[key].items():
                torch.testing.assert_close(rank_result[key][name], gradient, atol=1e-5, rtol=1e-5, msg=f"{key} {name}")
        for centroids, expected in zip(rank_result["centroids"], single["centroids"], strict=True):
            torch.testing.assert_close(centroids, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(rank_result["assignments"], single["assignments"])
        assert "differ between ranks" in rank_result["mismatch_error"]
        assert "differ between ranks" in rank_result["mismatch_error_nccl"]  # the check through its own gloo group
        assert rank_result["host_group_kept"]  # created once
    for first, second in zip(ranks[0]["centroids"], ranks[1]["centroids"], strict=True):
        assert torch.equal(first, second)
    assert (single["assignments"] >= 0).all()
