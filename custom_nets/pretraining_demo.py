"""The embedded demo: pretrain on a small multi-format corpus with the pretrain_joint bundle, then measure what the
pretraining adds, with the paper's yardstick (arXiv 2212.01893, section 4 of METHOD.md): label-efficient downstream
segmentation from the pretrained slice encoder against the same network from random initialisation.

Corpora (all generated, deterministic from ``seed``; see :func:`custom_nets.data.make_demo_corpus`):

- ``corpus`` (seed): the unlabelled pretraining corpus, 2D radiographs and CT/MR volumes (NIfTI and DICOM series).
- ``eval_corpus`` (seed + 1): held-out items whose embeddings are scored (NMI, kNN, linear probe, effective rank).
- ``seg_pool`` (seed + 2): labelled volumes (organ, bone) that the fine-tuning draws its few labelled volumes from.
- ``seg_test`` (seed + 3): the held-out labelled volumes, scored once with the committed settings, never trained on.
- ``seg_validation`` (seed + 4): labelled volumes for choosing corpus, protocol and hyperparameters
  (``split="validation"`` scores these instead of ``seg_test``).

Stages: random-init embeddings -> pretraining (bundle ``pretrain_joint``, preset ``cpu_demo``) -> export -> pretrained
embeddings -> fine-tuning ladder (bundle ``finetune_heart``, preset ``cpu_demo``: for each number of labelled volumes,
each seed, from the pretrained ``f_intra`` and from random initialisation, same schedule) -> report and plots.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from custom_nets.atomic_files import atomic_write_json
from custom_nets.data import make_demo_corpus
from custom_nets.data.demo import DEMO_CLASSES, DEMO_STRUCTURES
from custom_nets.data.segmentation import select_stratified
from custom_nets.metrics.embedding import embedding_separation, plot_effective_rank, plot_embeddings
from custom_nets.metrics.label_efficiency import label_efficiency_rows, plot_label_efficiency, pretraining_gain
from custom_nets.metrics.weight_change import ENCODER_STAGES, relative_change_by_stage, trunk_weights
from custom_nets.trials import run_trial, trial_metric
from custom_nets.weights import export_pretrained

__all__ = ["pretrain_bundle_root", "finetune_bundle_root", "run_demo", "run_bundle", "read_embeddings"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

PRESET = "configs/presets/cpu_demo.json"
REPORT_TITLE = "Joint image-volume pretraining demo (arXiv 2212.01893 on MONAI)"  # the printed report's first line
FINETUNE_PRESET = "presets/cpu_demo.json"
SLICES_PER_STEP = 6
"""Labelled slices per fine-tuning step, whatever the budget. The bundle batches volumes (``batch_size``), each giving
``slices_per_volume`` slices, so the trials set ``batch_size = SLICES_PER_STEP // slices_per_volume``."""
SHARED_WITH_INFERENCE = ("encoder_depth", "embed_dim", "image_size", "volume_size", "num_slices", "spacing", "amp")
SEGMENTATION_CLASSES = ("head", "thorax", "abdomen")
"""Hidden classes of the labelled volumes: those with both structures (the limb has no solid organ, and a class absent
from a volume scores 0 or 1 on a single voxel, which would make the Dice a coin toss)."""
INITS = ("random", "pretrained")
PROTOCOLS = {
    "frozen": {"freeze_encoder": True, "epochs": 120},
    "end_to_end": {"freeze_encoder": False},
    "frozen_then_end_to_end": {"freeze_encoder": False, "epochs": 30, "learning_rate": 0.001},
}
"""Fine-tuning protocols, bundle overrides over the finetune_heart ``cpu_demo`` preset:

- ``frozen`` trains the decoder on the fixed encoder (what the pretraining put into ``f_intra``), for 120 epochs (360
  steps). The decoder alone on fixed features needs more steps to converge: on the validation corpus (6 seeds,
  2026-11-28, with the batching before commit f4d8ee1) 60 -> 90 -> 120 epochs raised the random-feature decoder's Dice
  at 9 volumes 0.451 -> 0.556 -> 0.609 and the pretrained one's 0.571 -> 0.658 -> 0.664 (finetune_heart docs, "The demo
  preset").
- ``end_to_end`` trains the whole U-Net from a new decoder (what the paper's downstream tables do) for the preset's 60
  epochs (180 steps).
- ``frozen_then_end_to_end`` starts from the whole U-Net of the ``frozen`` trial of the same init, budget and seed
  (``STARTS_FROM``) and trains all of it (LP-FT, Kumar et al., ICLR 2022: a trained head first, so that the first
  end-to-end gradients do not come from a random decoder and wash out the pretrained features).
"""
STARTS_FROM = {"frozen_then_end_to_end": "frozen"}
"""Protocols whose trials start from the final U-Net (``models/model.pt``) of another protocol's trial."""
DEFAULT_PROTOCOLS = ("frozen",)
"""The protocols of ``make demo``. The frozen encoder alone brings the demo nearer its budget of about 5 minutes on 2
CPU cores (not within it): its 12 trials were about two thirds of the 356 fine-tuning seconds of the two-protocol demo
(2026-11-28, commit 169cfc5). Its gain from pretraining was as large or larger and steadier on both corpora (held out, 6
seeds: +0.056 +- 0.060 against LP-FT's +0.056 +- 0.082 with 3 labelled volumes, +0.061 against +0.041 with 9).
``frozen_then_end_to_end`` adds the end-to-end result (about 3 more minutes; ``python -m custom_nets.cli demo
--protocols frozen,frozen_then_end_to_end``)."""


def _bundle(name: str) -> Path:
    root = Path(__file__).resolve().parents[1] / "bundles" / name
    if not (root / "configs" / "train.json").is_file():
        raise FileNotFoundError(
            f"{root} is missing: the demo runs the bundles of a source checkout (git clone, then pip install -e .)."
        )
    return root


def pretrain_bundle_root() -> Path:
    """The pretrain_joint bundle of this source checkout."""
    return _bundle("pretrain_joint")


def finetune_bundle_root() -> Path:
    """The segmentation bundle the demo fine-tunes (finetune_heart: multi-structure CT/MR segmentation)."""
    return _bundle("finetune_heart")


def create_bundle_workflow(bundle_root: Path, config_files: Sequence[str], workflow_type: str, **overrides: object):
    """Create and initialise a bundle workflow in this process (not run yet)."""
    from monai.bundle import create_workflow

    files = [str(bundle_root / name) for name in config_files]
    return create_workflow(config_file=files, workflow_type=workflow_type, bundle_root=str(bundle_root), **overrides)


def run_bundle(bundle_root: Path, config_files: Sequence[str], workflow_type: str, **overrides: object):
    """Create, run and finalise a bundle workflow in this process; returns the finished workflow."""
    workflow = create_bundle_workflow(bundle_root, config_files, workflow_type, **overrides)
    workflow.run()
    workflow.finalize()
    return workflow


def read_embeddings(folder: Path) -> tuple[np.ndarray, list[dict[str, str]]]:
    """The ``embeddings.npy`` rows and ``embeddings.csv`` records written by the inference bundle."""
    import csv

    with open(folder / "embeddings.csv", newline="") as handle:
        records = list(csv.DictReader(handle))
    return np.load(folder / "embeddings.npy"), records


def _dataset_args(datalist: Path, seed: int) -> dict[str, object]:
    """The bundle overrides that point a workflow at a demo corpus."""
    return {"dataset_dir": str(datalist.parent), "datalist": str(datalist), "seed": seed}


def _rows_by_kind(records: list[dict[str, str]]) -> dict[str, tuple[list[int], np.ndarray]]:
    """Row numbers and hidden-class labels of the 2D images and of the volumes in ``embeddings.csv``."""
    result = {}
    for kind in ("image", "volume"):
        rows = [i for i, record in enumerate(records) if record["kind"] == kind]
        result[kind] = (rows, np.array([int(float(records[i]["class_label"])) for i in rows]))
    return result


def _separation_by_kind(embeddings: np.ndarray, rows_by_kind: Mapping, seed: int) -> dict[str, dict]:
    return {
        kind: embedding_separation(embeddings[rows], labels, seed=seed)
        for kind, (rows, labels) in rows_by_kind.items()
        if len(rows) >= 2
    }


class _StageClock:
    """Wall time of each named stage, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 1)
        logger.info("demo stage '%s' took %.1f s", name, self.seconds[name])


def make_segmentation_corpora(workdir: Path, pool_per_class: int, test_per_class: int, seed: int) -> dict[str, list]:
    """Write the labelled corpora (pool, test, validation; see the module docstring) and return their items, with
    paths relative to ``workdir``."""
    sections = {}
    for name, count, offset in (
        ("pool", pool_per_class, 2),
        ("test", test_per_class, 3),
        ("validation", test_per_class, 4),
    ):
        datalist = make_demo_corpus(
            workdir / f"seg_{name}",
            num_per_class=count,
            seed=seed + offset,
            with_labels=True,
            classes=SEGMENTATION_CLASSES,
        )
        items = json.loads(datalist.read_text())["training"]
        for item in items:
            for key in ("image", "label"):
                item[key] = f"seg_{name}/{item[key]}"
        sections[name] = items
    return sections


def write_trial_datalist(path: Path, corpora: Mapping[str, list], labelled: int, seed: int, split: str) -> Path:
    """The datalist of one fine-tuning trial: ``training`` holds ``labelled`` volumes of the pool drawn evenly over the
    hidden classes (:func:`select_stratified`, seeded), ``validation`` one validation volume per class (scored once,
    at the end of training), ``testing`` the test corpus (or the validation corpus when ``split == "validation"``)."""
    if split not in ("testing", "validation"):
        raise ValueError(f"split must be 'testing' or 'validation', got {split!r}.")
    per_class = len(corpora["validation"]) // len(SEGMENTATION_CLASSES)
    content = {
        "training": select_stratified(corpora["pool"], labelled, key="class_label", seed=seed),
        "validation": corpora["validation"][::per_class],
        "testing": corpora["test"] if split == "testing" else corpora["validation"],
        "scored_split": split,
        "labels": {str(i): name for i, name in enumerate(DEMO_STRUCTURES)},
    }
    atomic_write_json(path, content)
    return path


def trial_batching(slices_per_epoch: int, budget: int) -> tuple[int, int]:
    """``(slices_per_volume, batch_size)`` of a trial with ``budget`` labelled volumes: its share of the epoch's slices
    from each volume, and the volumes per step that make a step of ``SLICES_PER_STEP`` slices (the bundle batches
    volumes)."""
    per_volume = max(1, slices_per_epoch // budget)
    return per_volume, max(1, SLICES_PER_STEP // per_volume)


def protocol_overrides(protocol: str, overrides: Mapping[str, object]) -> dict[str, object]:
    """The bundle overrides of a trial of ``protocol``: the protocol's own (``PROTOCOLS``), then ``overrides``."""
    return {**PROTOCOLS[protocol], **overrides}


def default_trial_workers() -> int:
    """Fine-tuning trials run side by side: two where two or more cores are available, else one.

    The demo's trials are small (6 slices of 64 x 64 per step), so torch's threads scale poorly across cores: on 2 idle
    CPU cores, 4 demo trials took 82.7 s with two single-thread workers against about 99 s one at a time with two
    threads (2026-11-28, two runs each)."""
    return 2 if len(os.sched_getaffinity(0)) >= 2 else 1


def threads_per_worker(workers: int) -> int:
    """Torch threads of each of ``workers`` processes: the available cores shared out, at least one."""
    return max(1, len(os.sched_getaffinity(0)) // max(workers, 1))


def _set_trial_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def _call(function: Callable[..., T], job: Mapping[str, object]) -> T:
    return function(**job)


def run_in_workers(function: Callable[..., T], jobs: Sequence[Mapping[str, object]], workers: int) -> list[T]:
    """``function(**job)`` for every job, in order; with ``workers > 1`` in that many spawned processes, each with
    ``cores // workers`` torch threads. ``function`` must be importable by name (a module-level function).

    The demo runs its fine-tuning trials (:func:`custom_nets.trials.run_trial`) this way: each trial is seeded and
    runs with the same thread count whichever process takes it, so its result does not depend on the scheduling."""
    if workers <= 1:
        return [function(**job) for job in jobs]
    threads = threads_per_worker(workers)
    context = multiprocessing.get_context("spawn")  # no fork of a process whose OpenMP threads already started
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_set_trial_threads, initargs=(threads,)) as pool:
        return list(pool.map(_call, [function] * len(jobs), jobs))


def trial_dir(workdir: Path, protocol: str, init: str, budget: int, seed: int) -> Path:
    """The folder of one fine-tuning trial (its ``output_dir``; weights in ``models/model.pt``)."""
    return workdir / "finetune" / protocol / init / f"labelled_{budget}" / f"seed_{seed}"


def _trial_start(workdir: Path, protocol: str, init: str, budget: int, seed: int, weights: Path) -> dict[str, object]:
    """Where a trial's network starts: the pretrained encoder export or random initialisation, or, for a protocol in
    ``STARTS_FROM``, the whole U-Net that the other protocol's trial of the same init, budget and seed ended with."""
    if protocol not in STARTS_FROM:
        return {"pretrained_ckpt": str(weights) if init == "pretrained" else None}
    start = trial_dir(workdir, STARTS_FROM[protocol], init, budget, seed) / "models" / "model.pt"
    if not start.is_file():
        raise FileNotFoundError(
            f"{start} is missing: the {protocol} protocol starts from the {STARTS_FROM[protocol]} protocol's trials; "
            f"run that protocol first (run_demo orders them)."
        )
    return {"pretrained_ckpt": None, "init_ckpt": str(start)}


def ordered_protocols(protocols: Sequence[str]) -> list[str]:
    """``protocols``, each after the protocol it starts from (``STARTS_FROM``); raises if that one is not listed."""
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        raise ValueError(f"unknown fine-tuning protocols {unknown}; choose from {sorted(PROTOCOLS)}.")
    missing = [p for p in protocols if p in STARTS_FROM and STARTS_FROM[p] not in protocols]
    if missing:
        raise ValueError(
            f"the {missing[0]} protocol starts from the trials of {STARTS_FROM[missing[0]]!r}: list both protocols."
        )
    return sorted(dict.fromkeys(protocols), key=lambda p: p in STARTS_FROM)


def run_label_efficiency(
    workdir: Path,
    corpora: Mapping[str, list],
    weights: Path,
    labelled_volumes: Sequence[int],
    seeds: Sequence[int],
    slices_per_epoch: int,
    encoder_depth: int,
    protocol: str = "end_to_end",
    split: str = "testing",
    workers: int = 1,
    **overrides: object,
) -> dict[str, dict[str, dict[int, dict[int, float]]]]:
    """Fine-tune the segmentation bundle with ``protocol`` (a key of ``PROTOCOLS``) for every init, number of labelled
    volumes and seed (finished trials are reused), ``workers`` trials at a time (:func:`run_in_workers`); returns
    ``{metric: {init: {labelled_volumes: {seed: value}}}}`` for ``dice_mean`` and ``iou_mean``.

    Both inits of one (budget, seed) see the same labelled volumes, the same slices and the same schedule. Every trial
    sees ``slices_per_epoch`` slices per epoch whatever its budget (``slices_per_epoch // k`` of each of its ``k``
    volumes) in steps of ``SLICES_PER_STEP`` slices, so the budgets differ in labelled data, not in optimisation
    steps or batch size.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}.")
    batching = {budget: trial_batching(slices_per_epoch, budget) for budget in labelled_volumes}
    uneven = [
        budget
        for budget, (per_volume, _) in batching.items()
        if slices_per_epoch % budget or SLICES_PER_STEP % per_volume
    ]
    if uneven:
        logger.warning(
            "slices_per_epoch %d does not split into whole steps of %d slices from each of %s volumes: those trials "
            "see fewer slices per epoch or other batch sizes",
            slices_per_epoch,
            SLICES_PER_STEP,
            uneven,
        )
    bundle_root = finetune_bundle_root()
    if split == "validation":
        # the trials' end-of-training validation volumes are also scored: deliberate (no model selection happens, the
        # preset validates once, after the last epoch), so the bundle's duplicate-across-lists check is turned off
        overrides = {"validate_data": False, **overrides}
    keys, jobs = [], []
    for budget in labelled_volumes:
        for seed in seeds:
            datalist = write_trial_datalist(
                workdir / "finetune" / "datalists" / f"labelled_{budget}_seed_{seed}.json", corpora, budget, seed, split
            )
            for init in INITS:
                trial = trial_dir(workdir, protocol, init, budget, seed)
                keys.append((init, budget, seed, trial))
                jobs.append(
                    dict(
                        bundle_root=bundle_root,
                        trial_dir=trial,
                        seed=seed,
                        label_fraction=1.0,
                        presets=[FINETUNE_PRESET],
                        in_process=True,
                        dataset_dir=str(workdir),
                        datalist=str(datalist),
                        **_trial_start(workdir, protocol, init, budget, seed, weights),
                        encoder_depth=encoder_depth,
                        slices_per_volume=batching[budget][0],
                        batch_size=batching[budget][1],
                        **protocol_overrides(protocol, overrides),
                    )
                )
    results: dict[str, dict[str, dict[int, dict[int, float]]]] = {"dice_mean": {}, "iou_mean": {}}
    for (init, budget, seed, trial), summary in zip(keys, run_in_workers(run_trial, jobs, workers), strict=True):
        for metric, by_init in results.items():
            value = trial_metric(summary, metric, str(trial / "eval" / "summary.json"))
            by_init.setdefault(init, {}).setdefault(budget, {})[seed] = value
    return results


def encoder_weight_change(
    workdir: Path,
    initial_encoder: Mapping[str, torch.Tensor],
    weights: Path,
    labelled_volumes: Sequence[int],
    seeds: Sequence[int],
    protocols: Sequence[str],
) -> dict[str, object]:
    """Relative weight change of the slice encoder per stage (:func:`relative_change_by_stage`): by pretraining
    (initialisation -> export) and by fine-tuning the pretrained encoder (export -> each trial's model, mean over seeds
    per budget) in the first of ``protocols`` that trains the encoder. Shows which stages keep what pretraining put
    there.

    Returns:
        ``{"pretraining": {stage: change}, "fine_tuning": {budget: {stage: change}}, "fine_tuning_protocol": name}``;
        the last two only when a protocol that trains the encoder ran (the frozen protocol leaves it as exported).
    """
    pretrained = torch.load(weights, map_location="cpu", weights_only=True)
    change: dict[str, object] = {"pretraining": relative_change_by_stage(initial_encoder, pretrained)}
    tuning = [protocol for protocol in protocols if not PROTOCOLS[protocol]["freeze_encoder"]]
    if tuning:
        by_budget = {}
        for budget in labelled_volumes:
            trials = []
            for seed in seeds:
                model_file = trial_dir(workdir, tuning[0], "pretrained", budget, seed) / "models" / "model.pt"
                tuned_state = torch.load(model_file, map_location="cpu", weights_only=True)
                trials.append(relative_change_by_stage(pretrained, tuned_state))
            by_budget[str(budget)] = {stage: float(np.mean([t[stage] for t in trials])) for stage in trials[0]}
        change["fine_tuning"] = by_budget
        change["fine_tuning_protocol"] = tuning[0]
    return change


def _format_report(report: Mapping) -> str:
    lines = ["", REPORT_TITLE, "=" * 72]
    first, last = report["loss_terms"][0], report["loss_terms"][-1]
    lines.append(f"pretraining: epochs {last['epoch']}, iterations {report['iterations']}")
    columns = [k for k in ("intra", "inter", "mask", "dense") if k in last] + ["total"]
    lines.append("loss by term (epoch mean)   " + "  ".join(f"{k:>7}" for k in columns))
    for name, terms in (("first epoch", first), ("last epoch", last)):
        lines.append(f"  {name:<26}" + "  ".join(f"{terms.get(k, float('nan')):7.3f}" for k in columns))
    for name, stats in report["prototypes"].items():
        lines.append(f"prototypes in use ({name}): {stats}")
    for name in ("intra", "inter"):
        curve = [f"{record[name]:.1f}" for record in report["training_rank_history"] if name in record]
        if curve:
            lines.append(f"effective rank of {name} features during training: {' -> '.join(curve)}")
    lines.append("")
    downstream = report["downstream"]
    lines.append(
        f"downstream: {downstream['task']}; {downstream['test_volumes']} held-out {downstream['scored_split']} "
        f"volumes, {len(downstream['seeds'])} seeds per cell"
    )
    width = max(len(protocol) for protocol in downstream["protocols"])
    lines.append(
        f"  {'protocol':<{width}} labelled  metric  random init       pretrained        gain +- paired std  "
        "clear (> larger std)  seeds won"
    )
    for protocol, result in downstream["protocols"].items():
        for metric, rows in result["rows"].items():
            for budget in downstream["labelled_volumes"]:
                found = {row["init"]: row for row in rows if row["labelled_volumes"] == budget}
                gain = pretraining_gain(rows, budget)
                lines.append(
                    f"  {protocol:<{width}} {budget:>8}  {metric[:-5]:<6}  "
                    + "  ".join(f"{found[i]['mean']:.3f} +- {found[i]['std']:.3f}" for i in INITS)
                    + f"  {gain['gain']:+.3f} +- {gain['paired_std']:.3f}     {'yes' if gain['clear'] else 'no':<20}"
                    + f"  {gain['wins']}/{gain['trials']}"
                )
    lines.append("")
    lines.append("held-out embeddings                      random init -> pretrained")
    for kind, metrics in report["pretrained"].items():
        for metric in ("effective_rank", "linear_probe_accuracy", "knn_accuracy", "nmi"):
            before, after = report["random_init"][kind][metric], metrics[metric]
            lines.append(
                f"  {kind:>6} {metric:<22} (n={metrics['count']:>3})  "
                f"{before:7.3f} -> {after:7.3f}  ({after - before:+.3f})"
            )
    rank = report["volume_rank_target"]
    lines.append(
        f"f_inter effective rank {rank['pretrained']:.1f} vs random {rank['random']:.1f}: "
        f"{'meets' if rank['met'] else 'misses'} the target (>= half of random)"
    )
    lines.append("")
    change = report["weight_change"]
    lines.append("encoder weight change ||dW|| / ||W||    " + "  ".join(f"{stage:>6}" for stage in ENCODER_STAGES))
    rows = [("pretraining", change["pretraining"])]
    for budget, stages in change.get("fine_tuning", {}).items():
        rows.append((f"{change['fine_tuning_protocol'].replace('_', ' ')}, {budget} labelled", stages))
    for name, stages in rows:
        lines.append(
            f"  {name:<36}  " + "  ".join(f"{stages.get(stage, float('nan')):6.3f}" for stage in ENCODER_STAGES)
        )
    lines.append("")
    lines.append("wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in report["stage_seconds"].items()))
    lines.append("plots: " + ", ".join(report["plots"].values()))
    lines.append(f"report: {report['report']}")
    return "\n".join(lines)


def run_demo(
    workdir: str | os.PathLike = "demo_output",
    epochs: int | None = None,
    num_per_class: int = 16,
    eval_per_class: int = 12,
    seed: int = 0,
    num_workers: int | None = None,
    labelled_volumes: Sequence[int] = (3, 9),
    finetune_seeds: Sequence[int] = (0, 1, 2),
    pool_per_class: int = 8,
    test_per_class: int = 4,
    slices_per_epoch: int = 18,
    split: str = "testing",
    protocols: Sequence[str] = DEFAULT_PROTOCOLS,
    pretrain_overrides: Mapping[str, object] | None = None,
    finetune_overrides: Mapping[str, object] | None = None,
    finetune_workers: int | None = None,
) -> dict:
    """Run the whole demo and return the report dict (also written to ``<workdir>/report.json``).

    Args:
        workdir: folder for the corpora, the runs, embeddings, report and plots. Corpora are reused; pretraining
            restarts from scratch, and so do the fine-tuning trials (``<workdir>/finetune`` is emptied: its trials
            started from the previous run's weights).
        epochs: pretraining epochs (default: the cpu_demo preset's).
        num_per_class: volumes and 2D images per hidden class of the pretraining corpus.
        eval_per_class: volumes and 2D images per hidden class of the held-out embedding corpus.
        seed: seed of the corpora (see the module docstring), the pretraining and its augmentations.
        num_workers: data loader workers of pretraining and embedding (default: the preset's).
        labelled_volumes: the label budgets of the fine-tuning ladder.
        finetune_seeds: one fine-tuning trial per seed, init and budget (the seed picks the labelled volumes too).
        pool_per_class / test_per_class: labelled volumes per class of the pool and of the test (and validation) corpus.
        slices_per_epoch: labelled slices per fine-tuning epoch, whatever the budget: a multiple of every budget whose
            share per volume divides ``SLICES_PER_STEP`` keeps every step a full batch of 6 slices (18: 6 slices of
            each of 3 volumes, one volume per step; 2 of each of 9, three volumes per step; 3 steps per epoch).
        split: ``"testing"`` scores the held-out test corpus; ``"validation"`` the validation corpus (for tuning).
        protocols: fine-tuning protocols (keys of ``PROTOCOLS``), each a full ladder of trials, run after the protocol
            they start from (``STARTS_FROM``). By default the frozen encoder only (what pretraining put into the
            features; ``DEFAULT_PROTOCOLS`` says why). ``frozen_then_end_to_end`` fine-tunes, from those trials, the
            whole U-Net (LP-FT). Plain ``end_to_end`` (a new decoder, the encoder trained from the first step) gained
            less from pretraining on the validation corpus (+0.021 against +0.069 Dice with 3 labelled volumes, 6
            seeds) and scored lower with 9 volumes from both inits (finetune_heart docs, "The demo preset").
        pretrain_overrides / finetune_overrides: further bundle overrides (experiments).
        finetune_workers: fine-tuning trials run side by side (default: :func:`default_trial_workers`); each trial's
            result is the same whichever worker runs it, but depends on the torch threads per worker (cores // workers).
            The workers are spawned processes, which import the calling script again: a script that calls
            ``run_demo`` (or ``run_label_efficiency`` with ``workers > 1``) must do so under
            ``if __name__ == "__main__":``, as for any ``multiprocessing`` code; the command line needs nothing.
    """
    protocols = ordered_protocols(protocols)
    finetune_workers = default_trial_workers() if finetune_workers is None else finetune_workers
    workdir = Path(workdir).resolve()
    clock = _StageClock()
    bundle_root = pretrain_bundle_root()
    preset = {**json.loads((bundle_root / PRESET).read_text()), **(pretrain_overrides or {})}
    with clock("corpora"):
        datalist = make_demo_corpus(workdir / "corpus", num_per_class=num_per_class, seed=seed)
        eval_datalist = make_demo_corpus(workdir / "eval_corpus", num_per_class=eval_per_class, seed=seed + 1)
        corpora = make_segmentation_corpora(workdir, pool_per_class, test_per_class, seed)
    shared = {key: preset[key] for key in SHARED_WITH_INFERENCE if key in preset}
    if num_workers is not None:
        shared["num_workers"] = num_workers
    inference_args = {**_dataset_args(eval_datalist, seed), **shared}
    with clock("embed (random init)"):
        run_bundle(
            bundle_root,
            ["configs/inference.json"],
            "inference",
            **inference_args,
            ckpt_path="",
            output_dir=str(workdir / "embeddings_random"),
        )
    train_overrides = {**_dataset_args(datalist, seed), **(pretrain_overrides or {})}
    train_overrides.update(output_dir=str(workdir / "run"), resume=False)
    if epochs is not None:
        train_overrides["epochs"] = epochs
    if num_workers is not None:
        train_overrides["num_workers"] = num_workers
    with clock("pretrain"):
        workflow = create_bundle_workflow(bundle_root, ["configs/train.json", PRESET], "train", **train_overrides)
        initial_encoder = trunk_weights(workflow.parser.get_parsed_content("network_def").state_dict())
        workflow.run()
        workflow.finalize()
    handlers = workflow.parser.get_parsed_content("train#handlers") + workflow.parser.get_parsed_content(
        "train#rank0_handlers"
    )
    weights = export_pretrained(
        workdir / "run" / "model_final.pt",
        workdir / "model.pt",
        provenance={"preset": "cpu_demo", "datalist": str(datalist), "bundle": "pretrain_joint"},
    )
    with clock("embed (pretrained)"):
        run_bundle(
            bundle_root,
            ["configs/inference.json"],
            "inference",
            **inference_args,
            ckpt_path=str(weights),
            output_dir=str(workdir / "embeddings_pretrained"),
        )
    with clock("fine-tune"):
        shutil.rmtree(workdir / "finetune", ignore_errors=True)
        results = {
            protocol: run_label_efficiency(
                workdir,
                corpora,
                weights,
                labelled_volumes,
                finetune_seeds,
                slices_per_epoch,
                encoder_depth=preset["encoder_depth"],
                protocol=protocol,
                split=split,
                workers=finetune_workers,
                **(finetune_overrides or {}),
            )
            for protocol in protocols
        }
    with clock("report"):
        report = _demo_report(workdir, workflow, handlers, weights, results, seed)
        report["weight_change"] = encoder_weight_change(
            workdir, initial_encoder, weights, labelled_volumes, finetune_seeds, protocols
        )
    report["downstream"].update(
        {
            "task": "organ + bone segmentation, slice-encoder U-Net (bundle finetune_heart, preset cpu_demo)",
            "scored_split": split,
            "test_volumes": test_per_class * len(SEGMENTATION_CLASSES),
            "labelled_pool": len(corpora["pool"]),
            "labelled_volumes": list(labelled_volumes),
            "seeds": list(finetune_seeds),
            "slices_per_epoch": slices_per_epoch,
            "finetune_workers": finetune_workers,
            "threads_per_worker": threads_per_worker(finetune_workers),
            "protocol_overrides": {
                protocol: protocol_overrides(protocol, finetune_overrides or {}) for protocol in protocols
            },
        }
    )
    report["stage_seconds"] = clock.seconds
    report["stage_seconds"]["total"] = round(sum(clock.seconds.values()), 1)
    atomic_write_json(workdir / "report.json", report)
    print(_format_report(report))
    return report


def _demo_report(workdir: Path, workflow, handlers: Sequence, weights: Path, results: Mapping, seed: int) -> dict:
    """Scores of the held-out embeddings, the label-efficiency rows, and the two plots."""
    random_embeddings, records = read_embeddings(workdir / "embeddings_random")
    pretrained_embeddings, _ = read_embeddings(workdir / "embeddings_pretrained")
    rows_by_kind = _rows_by_kind(records)
    random_scores = _separation_by_kind(random_embeddings, rows_by_kind, seed)
    pretrained_scores = _separation_by_kind(pretrained_embeddings, rows_by_kind, seed)
    rank_monitor = next((h for h in handlers if type(h).__name__ == "EffectiveRankMonitor"), None)
    volume_rank = {
        "random": random_scores["volume"]["effective_rank"],
        "pretrained": pretrained_scores["volume"]["effective_rank"],
    }
    volume_rank["met"] = bool(volume_rank["pretrained"] >= 0.5 * volume_rank["random"])
    protocols = {}
    curve_rows = []
    for protocol, by_metric in results.items():
        rows = {metric: label_efficiency_rows(by_init) for metric, by_init in by_metric.items()}
        smallest = min(row["labelled_volumes"] for row in rows["dice_mean"])
        protocols[protocol] = {
            "rows": rows,
            "gain_at_smallest_budget": {metric: pretraining_gain(r, smallest) for metric, r in rows.items()},
        }
        curve_rows += [{**row, "init": f"{row['init']}, {protocol.replace('_', '-')}"} for row in rows["dice_mean"]]
    curve = plot_label_efficiency(
        curve_rows,
        workdir / "label_efficiency.png",
        metric="Dice",
        title="Organ + bone segmentation from few labelled volumes",
    )
    panels = {}
    for kind, (kind_rows, labels) in rows_by_kind.items():
        panels[f"{kind}s, random init"] = (random_embeddings[kind_rows], labels)
        panels[f"{kind}s, pretrained"] = (pretrained_embeddings[kind_rows], labels)
    scatter = plot_embeddings(
        panels, workdir / "embeddings.png", title="PCA of held-out embeddings by hidden class", class_names=DEMO_CLASSES
    )
    rank_history = list(rank_monitor.history) if rank_monitor is not None else []
    rank_curve = plot_effective_rank(
        rank_history, workdir / "effective_rank.png", title="Effective rank of training features (rolling 256 rows)"
    )
    return {
        "iterations": workflow.trainer.state.iteration,
        "loss_terms": next(h.history for h in handlers if type(h).__name__ == "LossTermsHandler"),
        "prototypes": {
            h.name: [round(s.get("prototypes_in_use", float("nan")), 1) for s in h.last_statistics]
            for h in handlers
            if type(h).__name__ == "ClusterCollapseMonitor"
        },
        "training_rank": dict(rank_monitor.last) if rank_monitor is not None else {},
        "training_rank_history": rank_history,
        "random_init": random_scores,
        "pretrained": pretrained_scores,
        "volume_rank_target": volume_rank,
        "downstream": {"protocols": protocols},
        "weights": str(weights),
        "plots": {"label_efficiency": str(curve), "embeddings": str(scatter), "effective_rank": str(rank_curve)},
        "report": str(workdir / "report.json"),
    }
