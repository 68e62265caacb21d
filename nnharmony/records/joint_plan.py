"""The joint plan's own record: the typed view of the ``"nnharmony"`` key of a collection's joint plans.

The joint plans are a valid nnU-Net plans dict (``PlansManager`` reads them unchanged); nnharmony adds one
top-level key, ``"nnharmony"``, and this module is the only code that reads or writes it (like nnU-Net's
``PlansManager`` for the rest). :class:`JointPlan` is a *view*: it wraps the plans dict it is given and its
setters change that dict, so a trainer's ``plans_manager.plans`` (saved as the model folder's ``plans.json``)
carries what the trainer records.

The record::

    "nnharmony": {
      "collection": "<name>",
      "member_plans_identifier": "nnUNetPlans",           # the members' nnU-Net plans the joint plan was built on
      "member_plans": {"901": {"plans_identifier": "nnUNetPlans", "transpose_forward": [...],
                               "configurations": {"3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres",
                                                                "spacing": [...], "patch_size": [...], ...}}}},
      "reconciliation": {"3d_fullres": {...}},             # the inputs of the shared-patch rule, for the record
      "extends": "<collection>",                           # planned --extends (optional)
      "uharmony": {...}, "hermes": {...}, "universeg": {...}   # method records, written by the trainers
    }
"""
from __future__ import annotations

from copy import deepcopy
from typing import Any, Iterable, Mapping

#: the top-level key of the joint plans that holds nnharmony's record
RECORD_KEY = "nnharmony"
#: the members' plans identifier of joint plans that do not record one (nnU-Net's default)
DEFAULT_MEMBER_PLANS = "nnUNetPlans"
#: the records of the methods (one :class:`~nnharmony.records.method_config.MethodConfig` subclass each)
METHOD_RECORDS = ("uharmony", "hermes", "universeg")


class NotJointPlansError(ValueError):
    """Plans without the ``"nnharmony"`` record: a member's own nnU-Net plans, not a collection's joint plans."""


class JointPlan:
    """View of ``plans["nnharmony"]``. ``JointPlan(plans)`` accepts any plans dict (:meth:`is_joint` tells
    whether it has the record; readers of a missing record get the defaults); :meth:`require` raises
    :class:`NotJointPlansError` for plans that are not a collection's."""

    def __init__(self, plans: Mapping[str, Any]):
        self.plans = plans

    # ------------------------------------------------------------------ construction
    @staticmethod
    def is_joint(plans: Any) -> bool:
        return isinstance(plans, Mapping) and RECORD_KEY in plans

    @classmethod
    def require(cls, plans: Mapping[str, Any], message: str) -> "JointPlan":
        """The view of ``plans``; ``NotJointPlansError(message)`` if they are not a collection's joint plans."""
        if not cls.is_joint(plans):
            raise NotJointPlansError(message)
        return cls(plans)

    @classmethod
    def create(cls, plans: dict, collection: str, member_plans_identifier: str) -> "JointPlan":
        """Adds a fresh record to ``plans`` (the joint planner's output) and returns its view."""
        plans[RECORD_KEY] = {"collection": collection, "member_plans_identifier": member_plans_identifier,
                             "member_plans": {}, "reconciliation": {}}
        return cls(plans)

    @property
    def record(self) -> Mapping[str, Any]:
        """The raw record (empty when absent); read-only use: the setters below write it."""
        return self.plans.get(RECORD_KEY) or {}

    def _write(self, **fields: Any) -> None:
        """Replaces the record by a copy with ``fields`` set (never mutates a record another plans dict shares)."""
        self.plans[RECORD_KEY] = {**self.record, **fields}

    # ------------------------------------------------------------------ members
    @property
    def collection(self) -> str | None:
        return self.record.get("collection")

    @property
    def member_plans_identifier(self) -> str:
        """The members' nnU-Net plans identifier the joint plan was built on (``nnUNetPlans`` if not recorded)."""
        return self.record.get("member_plans_identifier", DEFAULT_MEMBER_PLANS)

    def member_entry(self, dataset_id: int | str) -> Mapping[str, Any]:
        """The record of member ``dataset_id``'s own plans (empty when not recorded)."""
        return (self.record.get("member_plans") or {}).get(str(dataset_id), {})

    def set_member_entry(self, dataset_id: int | str, entry: dict) -> None:
        self.plans[RECORD_KEY].setdefault("member_plans", {})[str(dataset_id)] = entry

    def plans_identifier(self, dataset_id: int | str) -> str:
        """Member ``dataset_id``'s nnU-Net plans identifier (``DatasetXXX/<it>.json``)."""
        return self.member_entry(dataset_id).get("plans_identifier", self.member_plans_identifier)

    def data_identifier(self, dataset_id: int | str, configuration: str) -> str | None:
        """The folder of member ``dataset_id``'s preprocessed data of ``configuration``, as recorded when the
        collection was planned; None when not recorded (then nnU-Net's ``PLANS_CONFIGURATION`` applies, see
        :func:`nnharmony.data.splits.member_case_ids`)."""
        return (self.member_entry(dataset_id).get("configurations") or {}).get(configuration, {}).get(
            "data_identifier")

    def data_identifiers(self, dataset_ids: Iterable[int | str], configuration: str) -> dict[int, str]:
        """Member index -> recorded data identifier of ``configuration`` (the ``data_identifiers`` argument of
        :func:`nnharmony.data.splits.collection_fold`), for the members' dataset ids in collection order."""
        out = {}
        for i, d in enumerate(dataset_ids):
            did = self.data_identifier(d, configuration)
            if did is not None:
                out[i] = did
        return out

    def set_reconciliation(self, configuration: str, record: dict) -> None:
        self.plans[RECORD_KEY].setdefault("reconciliation", {})[configuration] = record

    def with_member_plans_identifier(self, identifier: str) -> dict:
        """A shallow copy of the plans whose record names ``identifier`` as the members' plans (a plans variant)."""
        out = dict(self.plans)
        out[RECORD_KEY] = {**self.record, "member_plans_identifier": identifier}
        return out

    # ------------------------------------------------------------------ extends
    @property
    def extends(self) -> str | None:
        """The collection these plans extend (planned ``--extends OLD``), None if none."""
        return self.record.get("extends")

    @extends.setter
    def extends(self, collection: str | None) -> None:
        self._write(extends=collection)

    # ------------------------------------------------------------------ method records
    def method_record(self, method: str) -> Any:
        """The record ``method`` (``uharmony``, ``hermes``, ``universeg``) wrote into these plans, None if none."""
        return self.record.get(method)

    def set_method_record(self, method: str, record: Any) -> None:
        """Records ``method``'s configuration: the trainer's plans are saved as the model folder's ``plans.json``,
        and the static network builders read it back at inference, validation, analysis and adaptation."""
        self._write(**{method: deepcopy(record)})

    def extended_model_record(self, method: str, trainer: str, configuration: str) -> Any:
        """``method``'s record in the model folder of ``trainer`` trained on the collection these plans extend
        (``nnharmony_adapt`` loads that model, so the adapted network must match its weights); None when these
        plans extend nothing, that model is not trained, or its plans cannot be read."""
        import json

        from nnharmony.records.model_folder import model_folder

        if not self.extends:
            return None
        try:
            f = model_folder(self.extends, trainer, self.plans.get("plans_name", "nnHarmonyPlans"), configuration)
            old = json.loads((f / "plans.json").read_text()) if (f / "plans.json").is_file() else None
        except (OSError, ValueError, RuntimeError):
            return None
        return JointPlan(old).method_record(method) if isinstance(old, Mapping) else None
