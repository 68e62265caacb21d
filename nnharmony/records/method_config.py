"""``MethodConfig``: the base of the three methods' configurations (``UHarmonyConfig``, ``HermesConfig``,
``UniverSegConfig``, each a dataclass next to its trainer).

A method's options are one dataclass, validated in ``__post_init__``; the base gives them one behaviour:

* **from a value**: :meth:`MethodConfig.from_value` / :meth:`MethodConfig.updated` take the config itself, a dict
  (``--trainer-options`` JSON, a plans or checkpoint record) or None; unknown keys are an error that lists the
  known ones;
* **to and from the plans**: the trainer records its config in the joint plans under :attr:`MethodConfig.NAME`
  (:meth:`MethodConfig.to_plans`; saved as the model folder's ``plans.json``), and the static network builders
  read it back (:meth:`MethodConfig.from_plans`) at inference, validation, analysis and adaptation; a record
  written by an older version is brought up to date by :meth:`MethodConfig.upgrade_record`;
* **from a checkpoint**: the checkpoint's nnharmony record holds the same dict
  (:meth:`MethodConfig.checkpoint_record_of`);
* **compatibility**: :attr:`MethodConfig.ARCHITECTURE` names the fields that shape the network; a checkpoint
  only loads into a network with the same values (:meth:`MethodConfig.incompatibilities`).
"""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, ClassVar, Mapping, TypeVar

from nnharmony.records.joint_plan import JointPlan
from nnharmony.records.model_folder import checkpoint_record

C = TypeVar("C", bound="MethodConfig")


class MethodConfig:
    """Base of the methods' option dataclasses (module docstring). Subclasses are ``@dataclass`` es and set
    :attr:`NAME`; every field has a default."""

    #: the record's key in the joint plans and in checkpoints (``uharmony``, ``hermes``, ``universeg``)
    NAME: ClassVar[str] = ""
    #: fields that shape or parameterise the network (a checkpoint only loads into the same values)
    ARCHITECTURE: ClassVar[tuple[str, ...]] = ()
    #: fields the trainer records itself (not options a user sets)
    RECORDED: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ from a value
    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in cls.RECORDED]

    @classmethod
    def from_value(cls: type[C], value: "C | Mapping[str, Any] | None") -> C:
        """A config from itself, a dict or None (defaults)."""
        return cls().updated(value)

    def updated(self: C, value: "C | Mapping[str, Any] | None") -> C:
        """This configuration with ``value``'s entries applied (a whole config replaces it; None keeps it)."""
        if value is None:
            return self
        if isinstance(value, type(self)):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{self.NAME} options must be a JSON object, got {value!r}")
        known = {f.name for f in fields(self)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown {self.NAME} option(s) {unknown}; known: {self.option_names()}")
        return replace(self, **dict(value))

    def to_dict(self) -> dict:
        """Plain JSON values (tuples as lists), in field order."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    # ------------------------------------------------------------------ plans and checkpoints
    @classmethod
    def upgrade_record(cls, record: Mapping[str, Any]) -> Mapping[str, Any]:
        """A record written by an older version, in today's fields (default: as is)."""
        return record

    @classmethod
    def record_of(cls, plans: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The raw record in the joint plans (None if the trainer has not recorded one)."""
        return JointPlan(plans).method_record(cls.NAME)

    @classmethod
    def from_record(cls: type[C], record: Mapping[str, Any] | None, defaults: Mapping[str, Any] | None = None) -> C:
        """``record`` (upgraded) over ``defaults`` over the dataclass defaults."""
        base = cls().updated(dict(defaults or {}))
        return base.updated(cls.upgrade_record(record)) if record is not None else base

    @classmethod
    def from_plans(cls: type[C], plans: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> C:
        """The configuration recorded in the joint plans (a model folder's ``plans.json``), else ``defaults``."""
        return cls.from_record(cls.record_of(plans), defaults)

    def to_plans(self, plans: dict) -> None:
        """Records this configuration in the joint plans."""
        JointPlan(plans).set_method_record(self.NAME, self.to_dict())

    @classmethod
    def extended_model_record(cls, plans: Mapping[str, Any], trainer: str, configuration: str
                              ) -> Mapping[str, Any] | None:
        """The record of ``trainer``'s model of the collection these plans extend (``nnharmony_adapt``)."""
        return JointPlan(plans).extended_model_record(cls.NAME, trainer, configuration)

    @classmethod
    def checkpoint_record_of(cls, checkpoint: Any) -> Mapping[str, Any] | None:
        """The raw record in a checkpoint (None if absent)."""
        return (checkpoint_record(checkpoint) or {}).get(cls.NAME)

    # ------------------------------------------------------------------ compatibility
    def architecture(self) -> dict:
        return {k: getattr(self, k) for k in self.ARCHITECTURE}

    def incompatibilities(self, other: "MethodConfig | Mapping[str, Any]") -> dict[str, tuple[Any, Any]]:
        """``{field: (theirs, mine)}`` of the :attr:`ARCHITECTURE` fields where ``other`` (a config or a record)
        differs from this one: empty when a checkpoint of ``other`` loads into this network."""
        theirs = other.architecture() if isinstance(other, MethodConfig) else {
            k: other.get(k) for k in self.ARCHITECTURE}
        mine = self.architecture()
        return {k: (theirs[k], mine[k]) for k in mine if theirs[k] != mine[k]}
