"""Run a bundle's training workflow and SIGKILL this very process after a given iteration (crash-resume tests).

    python tests/engines/train_then_sigkill.py SPEC.json

SPEC holds ``config_file`` (list), ``kill_at_iteration`` and ``overrides`` (bundle keys, ``bundle_root`` included).
The kill comes from the process itself, so it lands at a known point of training and cannot be caught or cleaned up
after, like a node failure or the OOM killer.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from ignite.engine import Events
from monai.bundle import ConfigWorkflow


def main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    workflow = ConfigWorkflow(config_file=spec["config_file"], workflow_type="train", **spec["overrides"])
    workflow.initialize()
    workflow.trainer.add_event_handler(
        Events.ITERATION_COMPLETED(once=spec["kill_at_iteration"]), lambda _: os.kill(os.getpid(), signal.SIGKILL)
    )
    workflow.run()
    raise SystemExit(f"training finished before iteration {spec['kill_at_iteration']}: nothing was killed")


if __name__ == "__main__":
    main(sys.argv[1])
