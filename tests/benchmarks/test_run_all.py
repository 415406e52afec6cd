"""benchmarks/run_all.py: a script past its timeout is recorded as stopped with what it printed, and the section of a
device is replaced between its markers while the rest of the document stays."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

RUN_ALL = Path(__file__).resolve().parents[2] / "benchmarks" / "run_all.py"
spec = importlib.util.spec_from_file_location("run_all", RUN_ALL)
run_all = importlib.util.module_from_spec(spec)
sys.modules["run_all"] = run_all  # dataclasses look their module up there
spec.loader.exec_module(run_all)


def test_a_script_past_its_timeout_is_stopped_and_keeps_its_output() -> None:
    slow = run_all.Script("Slow", ["-c", "import time; print('| figure | 1 |', flush=True); time.sleep(30)"])
    text = run_all.run_script(slow, timeout_s=3)
    assert "stopped after the 3 s timeout" in text and "| figure | 1 |" in text and "Failed" in text
    quick = run_all.run_script(run_all.Script("Quick", ["-c", "print('# heading'); print('done')"]))
    assert "exit status 0" in quick and "###heading" not in quick and "### heading" in quick and "Failed" not in quick


def test_a_section_is_replaced_between_its_markers() -> None:
    document = "# Benchmarks\n\nhand-written\n"
    first = run_all.replace_section(document, "cuda", "old figures")
    assert "## All figures of one run: GPU" in first and "old figures" in first
    second = run_all.replace_section(first + "\nafter\n", "cuda", "new figures")
    assert "new figures" in second and "old figures" not in second
    assert second.startswith("# Benchmarks\n\nhand-written\n") and second.rstrip().endswith("after")
    both = run_all.replace_section(second, "cpu", "cpu figures")
    assert "new figures" in both and "cpu figures" in both


def test_the_demo_section_records_its_report_without_the_log_lines_before_it() -> None:
    demo = next(script for script in run_all.cpu_scripts(demo=True) if script.title == "Demo wall time")
    output = (
        "2026 - INFO - Epoch: 1/8\nwriting: seg.nii.gz\n\n" + demo.output_from + "\n=====\nwall time (s): total 241"
    )
    assert run_all.recorded_output(output, demo.output_from) == demo.output_from + "\n=====\nwall time (s): total 241"
    assert run_all.recorded_output("no report\nat all", demo.output_from) == "no report\nat all"  # kept whole
    assert run_all.recorded_output("a\nb", None) == "a\nb"
