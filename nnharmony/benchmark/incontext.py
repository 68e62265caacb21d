"""In-context prediction of the benchmark's validation cases (UniverSeg), in this process with the trained network.

UniverSeg is trained once on the whole collection -- holding each member out in turn would cost one training per
member -- and then segments each member's validation cases label by label from support sets of ``support_size``
(image, label) pairs drawn from that member's *training* cases of the fold, averaging ``ensemble`` sets. It
therefore measures in-context segmentation of tasks seen in training, not generalization to unseen tasks. The
images are the raw files, prepared exactly as ``nnharmony_predict --support`` prepares them (the same functions of
:mod:`nnharmony.inference.support`); a multi-channel member is given its first channel.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nnharmony.benchmark.files import label_tasks, raw_images, raw_label, safe_name


def predict_member(trainer, member, train_ids: Sequence[str], val_ids: Sequence[str], out_dir: Path,
                   support_size: int, ensemble: int, seed: int = 0) -> list[Path]:
    """Writes ``out_dir/<label>/<case><ending>`` for every label of ``member`` and validation case; the files."""
    import torch

    from nnharmony.inference.support import build_support_pool, predict_probabilities, read_image, write_mask

    cfg = trainer.universeg_config()
    dim, size = int(cfg["dim"]), tuple(int(s) for s in cfg["image_size"])
    net = trainer.unwrapped_network().eval()
    device = trainer.device
    support = []
    for c in train_ids:
        image, spacing, _ = read_image(raw_images(member, c)[0])
        label, _, _ = read_image(raw_label(member, c))
        support.append((c, image.astype(np.float32), label, spacing))
    queries = [(c, *read_image(raw_images(member, c)[0])) for c in val_ids]
    written = []
    for name, value in label_tasks(member):
        values = list(value) if isinstance(value, (list, tuple)) else [int(value)]
        pool = build_support_pool(support, values, dim, size)
        folder = out_dir / safe_name(name)
        folder.mkdir(parents=True, exist_ok=True)
        for n, (case, image, spacing, ref) in enumerate(queries):
            rng = np.random.default_rng([int(seed), n])
            with torch.no_grad():
                prob = predict_probabilities([net], image.astype(np.float32), spacing, pool, dim, size, support_size,
                                             ensemble, rng, device)
            target = folder / f"{case}{member.file_ending}"
            write_mask(prob, values[0], ref, target)  # a region: any of its values
            written.append(target)
    return written


def describe(opts: Any, spec) -> str:
    """The report's note on how the in-context method was evaluated."""
    multi = any(len(m.channels) > 1 for m in spec.members)
    return (f"trained once on the whole collection (no member held out); each label of each member segmented from "
            f"support sets of {opts.support_size} training cases of that member (K={opts.ensemble}), so tasks were "
            f"seen in training" + ("; multi-channel members: first channel only" if multi else ""))
