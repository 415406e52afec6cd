"""Check a datalist before training (fire CLI): every file opened with the training readers, all problems at once.

    python -m custom_nets.data.validate_data --path datalist.json [--base_dir DIR] [--keys "['training']"]

Prints a summary (items per kind and modality) or exits with one error listing each missing, corrupt, NaN-holding or
wrongly-dimensioned file and its fix. See :func:`custom_nets.data.datalist.validate_datalist`.
"""

from __future__ import annotations

from custom_nets.data.datalist import validate_datalist

__all__ = ["validate_datalist"]

if __name__ == "__main__":
    import fire

    fire.Fire(validate_datalist)
