"""Start a training: one process, several processes with torch DDP (``-num_gpus``), or under ``torchrun``.

Trainers that are ``nnHarmonyTrainer`` subclasses train one model on the whole collection. Any other
nnU-Net trainer (``nnUNetTrainer`` or a user's) is the per-dataset paradigm: it trains one plain nnU-Net per
member on that member's own plans and ``splits_final.json`` -- the same folds the collection uses -- so every
paradigm is compared on the same data.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from nnharmony.data.collection import CollectionError, CollectionSpec
from nnharmony.paths import COLLECTION_SPEC_FILE, collection_dir, joint_plans_path, preprocessed_dir
from nnharmony.records.joint_plan import JointPlan
from nnharmony.records.model_folder import find_trainer_class
from nnharmony.utils.io import load_json


@dataclass
class TrainingOptions:
    collection: str
    configuration: str
    fold: int | str
    trainer: str = "nnHarmonyTrainer"
    plans: str = "nnHarmonyPlans"
    device: str = "cuda"
    num_gpus: int = 1
    continue_training: bool = False
    validation_only: bool = False
    val_best: bool = False
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    val_iterations_per_epoch: int | None = None
    save_every: int | None = None
    disable_checkpointing: bool = False
    npz: bool = False
    pretrained_weights: str | None = None
    trainer_options: dict = field(default_factory=dict)


def _fold(value) -> int | str:
    return value if value == "all" else int(value)


def load_collection(name: str, plans: str) -> tuple[CollectionSpec, dict, dict]:
    """Spec, joint plans and collection dataset.json, with an error that says what to run if missing."""
    spec_file = collection_dir(name) / COLLECTION_SPEC_FILE
    plans_file = joint_plans_path(name, plans)
    if not spec_file.is_file() or not plans_file.is_file():
        raise CollectionError(
            f"collection {name} was not planned: {spec_file if not spec_file.is_file() else plans_file} is missing; "
            f"run nnharmony_plan_and_preprocess -d ... -n {name} first"
        )
    spec = CollectionSpec.load(spec_file)
    return spec, load_json(plans_file), load_json(collection_dir(name) / "dataset.json")


def apply_options(trainer, opts: TrainingOptions) -> None:
    if opts.epochs is not None:
        trainer.num_epochs = opts.epochs
    if opts.iterations_per_epoch is not None:
        trainer.num_iterations_per_epoch = opts.iterations_per_epoch
    if opts.val_iterations_per_epoch is not None:
        trainer.num_val_iterations_per_epoch = opts.val_iterations_per_epoch
    if opts.save_every is not None:
        trainer.save_every = opts.save_every
    trainer.disable_checkpointing = opts.disable_checkpointing
    for k, v in opts.trainer_options.items():
        if not hasattr(trainer, k):
            raise ValueError(f"trainer {type(trainer).__name__} has no option {k!r}")
        setattr(trainer, k, v)


#: keys not taken from ``-pretrained_weights``: the output layers, whose classes differ between tasks (as nnU-Net)
PRETRAINED_SKIP = (".seg_layers.",)


def _maybe_load(trainer, opts: TrainingOptions) -> None:
    """nnU-Net's ``maybe_load_checkpoint`` (``--c``, ``--val``, ``-pretrained_weights``) for every paradigm, with
    every file read by :func:`nnharmony.utils.safe_load.read_weights_file` -- nnU-Net's own loaders unpickle
    with ``weights_only=False``, which runs code from the file."""
    from nnharmony.utils.safe_load import load_weights_into

    if opts.continue_training and opts.pretrained_weights is not None:
        raise ValueError("--c (continue training) and -pretrained_weights exclude each other: a continued training "
                         "takes its weights from its own checkpoint")
    folder = trainer.output_folder
    checkpoint_file = None
    if opts.continue_training:
        names = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
        checkpoint_file = next((os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))),
                               None)
        if checkpoint_file is None:
            print(f"WARNING: --c: no checkpoint in {folder} to continue from; starting a new training")
    elif opts.validation_only:
        checkpoint_file = os.path.join(folder, "checkpoint_final.pth")
        if not os.path.isfile(checkpoint_file):
            raise FileNotFoundError(f"{checkpoint_file}: --val needs the final checkpoint of a finished training")
    elif opts.pretrained_weights is not None:
        if not trainer.was_initialized:
            trainer.initialize()
        keys = load_weights_into(trainer.network, opts.pretrained_weights, "pretrained weights file",
                                 skip=PRETRAINED_SKIP)
        print(f"pretrained weights: {len(keys)} tensors loaded from {opts.pretrained_weights} (output layers "
              f"{', '.join(PRETRAINED_SKIP)} not transferred)")
    if checkpoint_file is not None:
        _load_checkpoint(trainer, checkpoint_file)


def _load_checkpoint(trainer, checkpoint_file: str) -> None:
    """Load a checkpoint of this training into ``trainer``, read by the safe loader."""
    from nnharmony.trainers.nnharmony_trainer import nnHarmonyTrainer
    from nnharmony.utils.safe_load import torch_load_made_safe

    if isinstance(trainer, nnHarmonyTrainer):  # reads safely and checks the file's collection and trainer
        trainer.load_checkpoint(checkpoint_file)
    else:  # plain nnU-Net trainer (per-dataset paradigm): its own loader unpickles with weights_only=False
        with torch_load_made_safe("checkpoint"):
            trainer.load_checkpoint(checkpoint_file)


def _run_one(trainer, opts: TrainingOptions) -> None:
    apply_options(trainer, opts)
    _maybe_load(trainer, opts)
    if not opts.validation_only:
        trainer.run_training()
    if opts.val_best:  # nnUNetv2_train --val_best: validate the best checkpoint instead of the final weights
        best = os.path.join(trainer.output_folder, "checkpoint_best.pth")
        if not os.path.isfile(best):
            raise FileNotFoundError(f"{best}: --val_best needs the best checkpoint of this training")
        _load_checkpoint(trainer, best)
    trainer.perform_actual_validation(opts.npz)


def training_device(opts: TrainingOptions, rank: int = 0) -> torch.device:
    """The torch device of ``opts.device`` (rank: the CUDA device of a DDP rank); on a CPU one PyTorch thread per
    core (per GPU process), with CUDA one thread (the GPU does the work)."""
    if opts.device == "cpu":
        torch.set_num_threads(max(1, multiprocessing.cpu_count() // max(1, opts.num_gpus)))
        return torch.device("cpu")
    if opts.device == "mps":
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise ValueError("-device cuda was requested but no CUDA device is available; use -device cpu")
    torch.set_num_threads(1)
    return torch.device("cuda", rank)


def build_trainer(opts: TrainingOptions, device: torch.device):
    """The collection trainer, ready for ``run_training`` (not initialized)."""
    from nnharmony.trainers.nnharmony_trainer import nnHarmonyTrainer

    cls = find_trainer_class(opts.trainer)
    if not issubclass(cls, nnHarmonyTrainer):
        raise ValueError(f"{opts.trainer} is not a collection trainer")
    spec, plans, dataset_json = load_collection(opts.collection, opts.plans)
    plans = dict(plans)
    plans["continue_training"] = opts.continue_training
    if opts.configuration not in plans["configurations"]:
        raise CollectionError(f"collection {opts.collection} has no configuration {opts.configuration!r} in its joint "
                              f"plans (planned: {sorted(plans['configurations'])})")
    return cls(plans, opts.configuration, _fold(opts.fold), dataset_json, device)


def run_per_dataset(opts: TrainingOptions, cls: type) -> None:
    """Per-dataset paradigm: plain nnU-Net training of ``cls`` on every member with the member's own plans."""
    spec, joint, _ = load_collection(opts.collection, opts.plans)
    device = training_device(opts)
    ident = JointPlan(joint).member_plans_identifier
    for m in spec.members:
        plans = load_json(preprocessed_dir() / m.dataset_name / f"{ident}.json")
        plans["continue_training"] = opts.continue_training
        dj = load_json(preprocessed_dir() / m.dataset_name / "dataset.json")
        trainer = cls(plans, opts.configuration, _fold(opts.fold), dj, device)
        _run_one(trainer, opts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, opts: TrainingOptions, world_size: int) -> None:
    backend = "nccl" if opts.device == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        device = training_device(opts, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        _run_one(build_trainer(opts, device), opts)
    finally:
        dist.destroy_process_group()


def run_training(opts: TrainingOptions) -> None:
    from nnharmony.trainers.nnharmony_trainer import nnHarmonyTrainer

    cls = find_trainer_class(opts.trainer)
    if not issubclass(cls, nnHarmonyTrainer):
        if opts.num_gpus > 1:
            raise ValueError("-num_gpus > 1 is for collection trainers; run nnUNetv2_train per dataset instead")
        return run_per_dataset(opts, cls)
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # launched by torchrun (single or multi node): one process per GPU, rendezvous from the environment
        backend = "nccl" if opts.device == "cuda" else "gloo"
        dist.init_process_group(backend)
        try:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            device = training_device(opts, local_rank)
            if device.type == "cuda":
                torch.cuda.set_device(device)
            _run_one(build_trainer(opts, device), opts)
        finally:
            dist.destroy_process_group()
        return
    if opts.num_gpus > 1:
        if opts.device == "cuda" and torch.cuda.device_count() < opts.num_gpus:
            raise ValueError(f"-num_gpus {opts.num_gpus} but only {torch.cuda.device_count()} CUDA devices are visible")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        torch.multiprocessing.spawn(_ddp_worker, args=(opts, opts.num_gpus), nprocs=opts.num_gpus, join=True)
        return
    _run_one(build_trainer(opts, training_device(opts)), opts)
