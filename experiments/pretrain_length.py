"""Does longer pretraining raise the demo's downstream gain? (issue 10; validation corpus only, never the test corpus)

Arms: random initialisation, the demo's pretraining (``PL_SHORT`` = 8 epochs of the ``cpu_demo`` preset) and a
longer one (``PL_LONG`` epochs, the cosine schedule stretched over them); each fine-tuned with the demo's two protocols
(frozen encoder, end to end) on 3 and 9 labelled volumes, seeds 0-5, scored on the validation corpus. The corpora are
the demo's (seed 0); the DICOM series of the pretraining corpus are converted to NIfTI first (MONAI ``LoadImage``), so
that the run needs no ITK. Pretraining runs and fine-tuning ladders (6 trials each) run as parallel processes with one
torch thread each (a GPU machine with many cores); the table comes from the finished trials' summaries, so a run
stopped at ``PL_DEADLINE`` seconds reports what it finished.

Run on one H200 (2026-11-28, 397 s, ``PL_LONG=32``; results in the README, "What the demo does")::

    python experiments/pretrain_length.py prepare
    PL_LONG=32 PL_PRETRAIN_OVERRIDES='{"num_workers": 4}' OUT=results python experiments/pretrain_length.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

WORK = Path(os.environ.get("PL_WORK", "/tmp/pretrain_length"))
DATA = WORK / "data"
OUT = Path(os.environ.get("OUT", "pretrain_length_results"))
DEADLINE = float(os.environ.get("PL_DEADLINE", "430"))
LONG = int(os.environ.get("PL_LONG", "40"))
SHORT = int(os.environ.get("PL_SHORT", "8"))
SEED_GROUPS = [g.split(",") for g in os.environ.get("PL_SEED_GROUPS", "0,1,2;3,4,5").split(";")]
FT_OVERRIDES = json.loads(os.environ.get("PL_FT_OVERRIDES", "{}"))
PRETRAIN_OVERRIDES = json.loads(os.environ.get("PL_PRETRAIN_OVERRIDES", '{"num_workers": 4}'))
PROTOCOLS = ("frozen", "end_to_end")
BUDGETS = (3, 9)


def prepare() -> None:
    """The demo's corpora (seed 0) under ``DATA``, with the pretraining corpus' DICOM series converted to NIfTI."""
    import nibabel as nib
    import numpy as np
    from monai.transforms import LoadImage

    import custom_nets.pretraining_demo as demo
    from custom_nets.data import make_demo_corpus

    datalist = make_demo_corpus(DATA / "corpus", num_per_class=16, seed=0)
    demo.make_segmentation_corpora(DATA, pool_per_class=8, test_per_class=4, seed=0)
    content = json.loads(datalist.read_text())
    loader = LoadImage(image_only=True)
    for item in content["training"]:
        if "num_files" in item:
            image = loader(str(DATA / "corpus" / item["image"]))
            del item["num_files"]
            item["image"] = item["image"].rstrip("/") + ".nii.gz"
            affine = np.asarray(image.affine, dtype=np.float64)
            nib.save(nib.Nifti1Image(np.asarray(image), affine), str(DATA / "corpus" / item["image"]))
    (DATA / "corpus" / "datalist_nifti.json").write_text(json.dumps(content, indent=1))
    print(f"prepared {DATA}", flush=True)


def corpora() -> dict[str, list]:
    result = {}
    for name in ("pool", "test", "validation"):
        items = json.loads((DATA / f"seg_{name}" / "datalist.json").read_text())["training"]
        for item in items:
            for key in ("image", "label"):
                item[key] = f"seg_{name}/{item[key]}"
        result[name] = items
    return result


def pretrain(name: str, epochs: int) -> None:
    import custom_nets.pretraining_demo as demo
    from custom_nets.weights import export_pretrained

    run = WORK / name
    datalist = DATA / "corpus" / "datalist_nifti.json"
    overrides = {**demo._dataset_args(datalist, 0), **PRETRAIN_OVERRIDES}
    overrides.update(output_dir=str(run / "run"), resume=False, epochs=epochs)
    started = time.time()
    workflow = demo.create_bundle_workflow(
        demo.pretrain_bundle_root(), ["configs/train.json", demo.PRESET], "train", **overrides
    )
    workflow.run()
    workflow.finalize()
    export_pretrained(run / "run" / "model_final.pt", run / "model.pt", provenance={"epochs": epochs})
    print(f"PRETRAINED {name} {epochs} epochs in {time.time() - started:.0f} s", flush=True)


def ladder(name: str, protocol: str, init: str, weights: str, seeds: str) -> None:
    import custom_nets.pretraining_demo as demo

    work = WORK / "ladders" / name
    work.mkdir(parents=True, exist_ok=True)
    for corpus in ("seg_pool", "seg_test", "seg_validation"):
        if not (work / corpus).exists():
            (work / corpus).symlink_to(DATA / corpus)
    demo.INITS = (init,)
    seed_list = tuple(int(s) for s in seeds.split(","))
    demo.run_label_efficiency(
        work,
        corpora(),
        Path(weights),
        BUDGETS,
        seed_list,
        18,
        encoder_depth=18,
        protocol=protocol,
        split="validation",
        **FT_OVERRIDES,
    )


def collect() -> dict:
    """{arm: {protocol: {budget: {seed: dice}}}} from the finished trials' summaries."""
    results: dict = {}
    for summary in sorted((WORK / "ladders").glob("*/finetune/*/*/labelled_*/seed_*/eval/summary.json")):
        seed_dir = summary.parents[1]
        budget = seed_dir.parent.name.split("_")[1]
        protocol = seed_dir.parents[2].name
        arm = seed_dir.parents[4].name.split("__")[0]
        dice = json.loads(summary.read_text())["metrics"]["dice_mean"]["mean"]
        results.setdefault(arm, {}).setdefault(protocol, {}).setdefault(budget, {})[seed_dir.name.split("_")[1]] = dice
    return results


def mean_std(values) -> str:
    import numpy as np

    values = np.asarray(list(values), dtype=float)
    return f"{values.mean():+.3f} +- {values.std(ddof=1) if len(values) > 1 else 0.0:.3f}"


def table(results: dict) -> str:
    """One line per arm, protocol and budget: Dice mean +- std over seeds; for the pretrained arms, the gain over
    random init +- the std of the per-seed differences, the number of pairs and the seeds won."""
    lines = ["arm | protocol | budget | n | Dice mean +- std | gain vs random +- paired std (pairs, wins)"]
    for arm in sorted(results):
        for protocol in PROTOCOLS:
            for budget in map(str, BUDGETS):
                dice = results[arm].get(protocol, {}).get(budget, {})
                if not dice:
                    continue
                text = f"{arm} | {protocol} | {budget} | {len(dice)} | {mean_std(dice.values()).lstrip('+')}"
                random_dice = results.get("random", {}).get(protocol, {}).get(budget, {})
                gains = [dice[seed] - random_dice[seed] for seed in dice if seed in random_dice]
                if arm != "random" and gains:
                    text += f" | {mean_std(gains)} ({len(gains)}, {sum(gain > 0 for gain in gains)} wins)"
                lines.append(text)
    return "\n".join(lines)


def orchestrate() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    start = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    processes: dict[str, subprocess.Popen] = {}
    reported: set[str] = set()

    def launch(name: str, *args: str) -> None:
        log = open(WORK / f"{name}.log", "w")
        command = [sys.executable, __file__, *args]
        processes[name] = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        print(f"[{time.time() - start:5.0f} s] started {name}", flush=True)

    def launch_ladders(arm: str, init: str, weights: str) -> None:
        for protocol in PROTOCOLS:
            for group in SEED_GROUPS:
                name = f"{arm}__{protocol}__{'-'.join(group)}"
                launch(name, "ladder", name, protocol, init, weights, ",".join(group))

    arms = {"pre_short": SHORT, "pre_long": LONG}
    for arm, epochs in arms.items():
        launch(f"pretrain_{arm}", "pretrain", arm, str(epochs))
    launch_ladders("random", "random", "/nonexistent")
    while time.time() - start < DEADLINE:
        for name, process in list(processes.items()):
            code = process.poll()
            if code is None or name in reported:
                continue
            reported.add(name)
            print(f"[{time.time() - start:5.0f} s] {name} ended with {code}", flush=True)
            if code != 0:
                print("".join((WORK / f"{name}.log").read_text().splitlines(True)[-25:]), flush=True)
            if name.startswith("pretrain_") and code == 0:
                arm = name[len("pretrain_") :]
                launch_ladders(arm, "pretrained", str(WORK / arm / "model.pt"))
        (OUT / "results.json").write_text(json.dumps(collect(), indent=1))
        if len(reported) == len(processes):
            break
        time.sleep(3)
    for name, process in processes.items():
        if process.poll() is None:
            print(f"[{time.time() - start:5.0f} s] deadline: stopping {name}", flush=True)
            os.killpg(process.pid, signal.SIGKILL)
    results = collect()
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    text = table(results)
    (OUT / "summary.txt").write_text(text + "\n")
    for log in sorted(WORK.glob("pretrain_*.log")):
        lines = [line for line in log.read_text().splitlines() if "Epoch[" in line and "Complete" in line]
        print(log.name, "epochs completed:", len(lines), lines[-1] if lines else "", flush=True)
    subprocess.run(["tar", "czf", str(OUT / "logs.tar.gz"), "-C", str(WORK), *[p.name for p in WORK.glob("*.log")]])
    print(text, flush=True)
    print(f"total {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 1:
        orchestrate()
    elif sys.argv[1] == "prepare":
        prepare()
    elif sys.argv[1] == "pretrain":
        pretrain(sys.argv[2], int(sys.argv[3]))
    else:
        ladder(*sys.argv[2:])
