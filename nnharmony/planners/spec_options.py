"""Options of ``nnharmony_plan_and_preprocess`` that shape the collection spec, applied to a spec that exists.

Re-planning keeps an existing spec (hand edits survive), but an option given on the command line is applied to
the fields it controls, as a fresh plan would set them; fields that no given option controls stay as they are:

* ``--sampling`` / ``--temperature``: ``sampling``;
* ``--domain ID=NAME``: those members' ``domain`` (the domain list keeps its order; new names are appended,
  names no member uses any more are dropped);
* ``--modality-alias``: ``modalities`` and every member's ``channels``;
* ``--task-alias`` / ``--no-merge``: ``tasks`` and every member's ``tasks``.

Every change is reported in one line naming the option, the spec file and the old and new value.
"""
from __future__ import annotations

from typing import Any, Mapping

from nnharmony.data.collection import CollectionSpec

DEFAULT_SAMPLING = {"scheme": "sqrt", "temperature": 0.5}
# build_collection_spec keyword -> the command-line option that sets it
OPTION_FLAGS = {"sampling": "--sampling/--temperature", "domains": "--domain", "modality_aliases": "--modality-alias",
                "task_aliases": "--task-alias", "merge_by_name": "--no-merge"}


def build_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Keyword arguments of ``build_collection_spec``: a partial ``sampling`` is completed with the defaults."""
    out = dict(options or {})
    if "sampling" in out:
        out["sampling"] = {**DEFAULT_SAMPLING, **dict(out["sampling"])}
    return out


def apply_spec_options(spec: CollectionSpec, options: Mapping[str, Any], fresh: CollectionSpec,
                       source: str) -> list[str]:
    """Apply the given ``options`` to ``spec`` in place; ``fresh``: the spec a fresh plan with them would write.
    Returns one line per change."""
    changes: list[str] = []

    def changed(key: str, old: Any, new: Any) -> None:
        changes.append(f"{source}: {OPTION_FLAGS[key]}: {old} -> {new}")

    if "sampling" in options:
        sampling = {**spec.sampling, **dict(options["sampling"])}
        if sampling != spec.sampling:
            changed("sampling", spec.sampling, sampling)
            spec.sampling = sampling
    if "domains" in options:
        _apply_domains(spec, {int(k): str(v) for k, v in options["domains"].items()}, changed)
    if "modality_aliases" in options:
        old = (spec.modalities, [m.channels for m in spec.members])
        new = (fresh.modalities, [fresh.member(m.dataset_id).channels for m in spec.members])
        if old != new:
            changed("modality_aliases", old[0], new[0])
            spec.modalities = list(fresh.modalities)
            for m in spec.members:
                m.channels = list(fresh.member(m.dataset_id).channels)
    if "task_aliases" in options or "merge_by_name" in options:
        old_tasks = (spec.tasks, [m.tasks for m in spec.members])
        new_tasks = (fresh.tasks, [fresh.member(m.dataset_id).tasks for m in spec.members])
        if old_tasks != new_tasks:
            changed("task_aliases" if "task_aliases" in options else "merge_by_name", old_tasks[0], new_tasks[0])
            spec.tasks = list(fresh.tasks)
            for m in spec.members:
                m.tasks = list(fresh.member(m.dataset_id).tasks)
    return changes


def _apply_domains(spec: CollectionSpec, domains: Mapping[int, str], changed) -> None:
    for did, domain in domains.items():
        m = spec.member(did)
        if m.domain != domain:
            changed("domains", f"{m.dataset_name}={m.domain}", f"{m.dataset_name}={domain}")
            m.domain = domain
    used = [m.domain for m in spec.members]
    spec.domains = [d for d in spec.domains if d in used] + [d for d in dict.fromkeys(used) if d not in spec.domains]
