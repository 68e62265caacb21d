"""Resuming an interrupted benchmark: each method's results are written to ``methods/<method>.json`` in the report
folder as soon as it is scored, with the run's settings. ``--continue`` (``BenchmarkOptions.resume``) reuses the
results of a method whose file exists with the same settings, so a run of hours stopped in its fourth method
restarts there instead of from the first."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from nnharmony.utils.io import load_json, save_json_atomic

#: options that do not change a method's results (where the report goes, how it is shown, which methods run)
_NOT_SETTINGS = ("methods", "output_folder", "num_overlays", "quiet", "resume")


def settings_fingerprint(opts) -> str:
    """The options that decide a method's results, as canonical JSON."""
    settings = {k: v for k, v in dataclasses.asdict(opts).items() if k not in _NOT_SETTINGS}
    return json.dumps(settings, sort_keys=True, default=str)


def result_file(report_dir: Path, method: str) -> Path:
    return report_dir / "methods" / f"{method}.json"


def save_method_result(report_dir: Path, method: str, fingerprint: str, timing: dict, info: dict,
                       per_case: list[dict]) -> None:
    """Written atomically: a file that exists is complete."""
    path = result_file(report_dir, method)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_json_atomic({"settings": fingerprint, "timing": timing, "info": info, "per_case": per_case}, path)


def finished_method(report_dir: Path, method: str, fingerprint: str) -> tuple[dict, dict, list[dict]] | None:
    """(timing, info, per-case scores) of a method scored before with the same settings, else None (also when
    the file was written with other settings: that method runs again)."""
    path = result_file(report_dir, method)
    if not path.is_file():
        return None
    saved: dict[str, Any] = load_json(path)
    if saved.get("settings") != fingerprint:
        return None
    return saved["timing"], saved["info"], saved["per_case"]
