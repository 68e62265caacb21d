"""What a benchmark run does (:class:`BenchmarkOptions`) and the quick preset (:data:`QUICK`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from nnharmony.benchmark.budget import Budget
from nnharmony.benchmark.methods import DEFAULT_METHODS, METHODS, Method
from nnharmony.benchmark.plans_variant import PlansVariant

SYNTHETIC_COLLECTION = "Collection900_Synthetic"
SYNTHETIC_FIRST_ID = 901


@dataclass(frozen=True)
class Preset:
    """A named set of defaults (``--quick``)."""

    collection: str
    first_id: int
    #: ``nnharmony.dataset_conversion.synthetic`` member preset name, or None for ``num_cases`` x 3 default members
    members: str | None
    num_cases: int
    shape: tuple[int, int, int]
    budget: str
    configuration: str | None  # every method on this configuration (None: each method's own)
    support_size: int
    trainer_options: dict[str, dict[str, Any]]
    nsd_tolerance_mm: float | None
    #: planning and evaluation processes (1: in this process, no spawn workers that import torch first)
    num_processes: int
    #: train on this variant of the plans (narrower network, smaller batch); None: the plans as planned
    plans_variant: PlansVariant | None
    #: PyTorch threads on a CPU (None: one per core, as nnharmony_train)
    cpu_threads: int | None
    #: test-time mirroring in the final validation (nnU-Net: on; 4 forward passes per 2D tile instead of 1)
    validation_mirroring: bool = True
    #: method -> trainer class replacing the method's own (e.g. nnU-Net's Adam variant)
    trainers: dict[str, str] = field(default_factory=dict)
    #: seed of every method's run (None: unseeded)
    seed: int | None = None


#: ``nnharmony_benchmark --quick``: the newcomer's first run, aimed at trained models within 10 minutes on an idle
#: 2-core CPU. Why these values (README, "The main job"): 2D (a CPU trains a 2D U-Net step in a fraction of a 3D
#: one's time and the slices give many samples per case), small images (48 mm field of view at about 1 mm), one
#: planning, every method in this process, a narrower network and batch 4 (:mod:`.plans_variant`: within a CPU
#: budget batch 4 makes more updates than batch 8 and learnt more, see the README), 8 epochs
#: fitted into 1.5 minutes of the process's CPU time per method (the learning rate decays to zero; CPU time, not
#: wall time, so other jobs cost far fewer steps than a wall-clock budget would, though not none: a CPU second
#: buys fewer steps on a busy machine, see the README), seed 0.
QUICK = Preset(
    collection="Collection960_Quick", first_id=961, members="quick", num_cases=0, shape=(20, 48, 48),
    budget="8x1.5cpumin", configuration="2d", support_size=8, seed=0,
    # AdamW (lr 1e-3) for every supervised method: nnU-Net's SGD with momentum 0.99 needs hundreds of iterations
    # before its momentum builds up, more than a CPU minute gives; nnU-Net ships the same optimizer for plain
    # nnU-Net as nnUNetTrainerAdam1en3
    trainers={"nnunet": "nnUNetTrainerAdam1en3"},
    trainer_options={**{m: {"optimizer_name": "adamw"} for m in ("joint", "separate_heads", "uharmony", "hermes")},
                     "universeg": {"image_size": 48, "episode_batch_size": 4, "support_size": 8,
                                   "encoder_blocks": [32, 32, 32, 32]}},
    nsd_tolerance_mm=1.0, num_processes=1, plans_variant=PlansVariant("quick", base_features=16, max_batch_size=4),
    cpu_threads=1,
)


@dataclass
class BenchmarkOptions:
    methods: Sequence[str] = DEFAULT_METHODS
    budget: str = "1000x250"
    collection: str | None = None
    dataset_ids: Sequence[int | str] | None = None
    fold: int | str = 0
    device: str = "cpu"
    num_gpus: int = 1
    output_folder: str | None = None
    nsd_tolerance_mm: float | None = 1.0
    num_overlays: int = 3
    support_size: int = 8
    ensemble: int = 1
    trainer_options: dict = field(default_factory=dict)  # method -> {attribute: value}
    #: the built-in synthetic collection (used when neither ``collection`` nor ``dataset_ids`` is given)
    synthetic_collection: str = SYNTHETIC_COLLECTION
    synthetic_first_id: int = SYNTHETIC_FIRST_ID
    synthetic_members: str | None = None
    synthetic_cases: int = 8
    synthetic_shape: tuple = (32, 32, 32)
    #: every method on this configuration instead of its own (``Method.configuration``)
    configuration: str | None = None
    #: processes for planning, validation export and evaluation; 1: all in this process
    num_processes: int = 2
    plans_variant: PlansVariant | None = None
    #: PyTorch threads on a CPU (None: one per core). Small networks gain little from a second thread, and when
    #: the cores are shared, threads that wait for each other make every operation many times slower.
    cpu_threads: int | None = None
    #: method -> trainer class replacing the method's own
    trainers: dict = field(default_factory=dict)
    #: test-time mirroring in the supervised methods' final validation (nnU-Net's default: on)
    validation_mirroring: bool = True
    #: keep the trained models' checkpoints
    keep_checkpoints: bool = True
    #: seed of every method's run (network initialization, augmentation, member sampling); None: unseeded, as
    #: nnU-Net. With augmentation in the training process (``nnUNet_n_proc_DA=0``) a seeded CPU run repeats.
    seed: int | None = None
    #: the per-dataset paradigm's share of an EPOCHSxITERATIONS budget: "total" (its N models together get the
    #: budget, each ``iterations / N`` per epoch: equal total compute with one collection model) or "each" (every
    #: model gets the whole budget: equal iterations per model, N times the compute). A minutes budget is always
    #: split.
    per_dataset_budget: str = "total"
    #: also predict every member's validation cases with ``--dataset auto`` (methods that support it; needs the
    #: checkpoints): how often the inferred member is right, and the Dice with it
    auto_member: bool = False
    #: reuse the results of methods this report folder scored before with the same settings
    #: (:mod:`.resume`; ``--continue``)
    resume: bool = False
    quiet: bool = False  # no progress line

    @classmethod
    def from_preset(cls, preset: Preset, **overrides) -> "BenchmarkOptions":
        opts = cls(budget=preset.budget, synthetic_collection=preset.collection, synthetic_first_id=preset.first_id,
                   synthetic_members=preset.members, synthetic_cases=preset.num_cases, synthetic_shape=preset.shape,
                   configuration=preset.configuration, support_size=preset.support_size,
                   trainer_options={k: dict(v) for k, v in preset.trainer_options.items()},
                   nsd_tolerance_mm=preset.nsd_tolerance_mm, num_processes=preset.num_processes,
                   plans_variant=preset.plans_variant, cpu_threads=preset.cpu_threads, trainers=dict(preset.trainers),
                   validation_mirroring=preset.validation_mirroring, keep_checkpoints=False,
                   seed=preset.seed)
        for k, v in overrides.items():
            setattr(opts, k, v)
        return opts

    def configuration_of(self, method: Method) -> str:
        return self.configuration or method.configuration

    def method(self, name: str) -> Method:
        """The method with this run's trainer (``trainers``) and configuration."""
        m = METHODS[name]
        return dataclasses.replace(m, trainer=self.trainers.get(name, m.trainer), configuration=self.configuration_of(m))

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
        if not self.methods:
            raise ValueError("--methods: give at least one method")
        Budget.parse(self.budget)
        if self.per_dataset_budget not in ("total", "each"):
            raise ValueError(f"--per-dataset-budget must be 'total' or 'each', not {self.per_dataset_budget!r}")
        if self.num_gpus < 1:
            raise ValueError("--num_gpus must be at least 1")
        if self.fold != "all":
            try:
                self.fold = int(self.fold)
            except (TypeError, ValueError):
                raise ValueError(f"--fold must be an integer or 'all', not {self.fold!r}") from None
        for m in self.trainer_options:
            if m not in METHODS:
                raise ValueError(f"--trainer-options: unknown method {m!r}")
