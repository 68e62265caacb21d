"""A model of a collection into the network of a collection that extends it (``--extends``): the weights that
fit are copied, the axes that grew (modalities, tasks, domains) keep the old values in their leading slice."""
from __future__ import annotations

from nnharmony.data.collection import CollectionSpec


def transfer_state_dict(old: dict, new: dict, old_spec: CollectionSpec, new_spec: CollectionSpec) -> dict:
    """Old weights into the new network's state dict. Tensors of equal shape are copied. A tensor that grew
    along an axis whose old/new sizes are the old/new numbers of modalities, tasks or domains gets the old
    values in its leading slice (ids are kept by ``--extends``); the new slice keeps its fresh initialisation,
    except new *input-channel* weights (axis 1), which are zeroed so that a new modality starts with no effect."""
    counts = [(len(old_spec.modalities), len(new_spec.modalities)), (len(old_spec.tasks), len(new_spec.tasks)),
              (len(old_spec.domains), len(new_spec.domains))]
    out = dict(new)
    for key, target in new.items():
        if key not in old:
            continue
        src = old[key]
        if src.shape == target.shape:
            out[key] = src.clone()
            continue
        if src.ndim != target.ndim:
            raise ValueError(f"cannot transfer {key}: {tuple(src.shape)} -> {tuple(target.shape)}")
        merged = target.clone()
        slices = []
        for ax, (a, b) in enumerate(zip(src.shape, target.shape)):
            if a == b:
                slices.append(slice(None))
            elif a < b and (a, b) in counts:
                slices.append(slice(0, a))
                if ax == 1 and target.ndim > 2:
                    idx = [slice(None)] * target.ndim
                    idx[1] = slice(a, b)
                    merged[tuple(idx)] = 0
            else:
                raise ValueError(f"cannot transfer {key}: {tuple(src.shape)} -> {tuple(target.shape)} (axis {ax} "
                                 f"is not a modality, task or domain axis of the extended collection)")
        merged[tuple(slices)] = src
        out[key] = merged
    return out
