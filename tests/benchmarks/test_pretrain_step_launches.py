"""benchmarks/pretrain_step.py section (d) and its measure.py helpers: the CUDA-path stand-in of the slice sampling
computes the reference's values and gradients, and the per-phase launch counts add up to the step."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # pretrain_step imports its sibling measure.py
spec = importlib.util.spec_from_file_location("pretrain_step", BENCHMARKS / "pretrain_step.py")
pretrain_step = importlib.util.module_from_spec(spec)
sys.modules["pretrain_step"] = pretrain_step
spec.loader.exec_module(pretrain_step)

import measure  # noqa: E402

from custom_nets.nets.slice_sampling import slice_sampling_reference  # noqa: E402


def test_fused_sampling_stand_in_matches_the_reference_and_counts_three_launches() -> None:
    generator = torch.Generator().manual_seed(0)
    values, parameters = torch.randn(2, 5, 2, 4, generator=generator), torch.randn(2, 5, 2, 2, 3, generator=generator)
    valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    grad_output = torch.randn(2, 5, 2, 4, generator=generator)
    results = []
    counter = measure.OperatorCounter()
    for stand_in in (False, True):
        inputs = [tensor.clone().requires_grad_() for tensor in (values, parameters)]
        if stand_in:
            with counter:
                output = measure.FusedSamplingLaunches.apply(counter, *inputs, valid)
                output.backward(grad_output)
        else:
            output = slice_sampling_reference(inputs[0], *inputs[1].unbind(2), valid)
            output.backward(grad_output)
        results.append([output.detach()] + [tensor.grad for tensor in inputs])
    for stand_in_result, reference in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(stand_in_result, reference)
    assert counter.kernels == 3  # one forward kernel, a zero fill and one backward kernel: nothing else counted


def test_launch_count_splits_the_step_into_phases() -> None:
    shape = pretrain_step.StepShape(
        images_per_batch=2, image_size=32, small_crop_size=16, volumes_per_batch=2, num_slices=4, volume_size=32
    )
    count = pretrain_step.count_step_launches(shape, torch.device("cpu"))
    assert list(count.step_kernels) == list(pretrain_step.PHASES)
    assert count.step_kernels["optimizer"] < 20  # multi-tensor SGD: a few launches, not one per parameter
    assert sum(count.step_kernels.values()) > count.encoder_kernels > 100
    assert all(site.startswith("prepare_batch:") for _, site in count.host_syncs)  # none after the batch copy
    report = pretrain_step.report_launches(count)
    assert "the step's launches beyond the encoder's" in report and "prepare_batch" in report


def test_synthetic_batch_is_laid_out_as_the_loaders_batch(tmp_path: Path) -> None:
    """The step is timed on the synthetic batch, so it must hold what the loader's batch holds (keys, shapes, dtypes):
    anything missing would be work that ``prepare_batch`` and the network do in training but not in the benchmark."""
    shape = pretrain_step.StepShape(
        images_per_batch=2, image_size=32, small_crop_size=16, volumes_per_batch=2, num_slices=4, volume_size=32
    )
    datalist = str(pretrain_step.make_demo_corpus(tmp_path, num_per_class=1, in_plane=32, image_size=32))
    loader = pretrain_step.build_joint_dataloader(datalist, **pretrain_step.loader_kwargs(shape, "none", 0))
    loader_batch = next(iter(loader))
    synthetic = pretrain_step.synthetic_batch(shape)
    assert pretrain_step.batch_layout(synthetic) == pretrain_step.batch_layout(loader_batch)
