"""The methods' losses, one module each; every one reads only the supervised (sample, task) pairs.

* :mod:`.partial_label`: the universal baseline's (and U-Harmony's) masked BCE + soft Dice over the global tasks
  (MultiTalent-style partial labels), with nnU-Net's deep-supervision weights.
* :mod:`.hermes`: Hermes's masked BCE + adaptive Dice per task + modality cross-entropy.
* :mod:`.universeg`: UniverSeg's soft Dice + BCE on one binary mask per episode.
"""
from nnharmony.losses.hermes import HermesLoss
from nnharmony.losses.partial_label import PartialLabelLoss, nnunet_deep_supervision_weights
from nnharmony.losses.universeg import SoftDiceBCELoss

__all__ = ["HermesLoss", "PartialLabelLoss", "SoftDiceBCELoss", "nnunet_deep_supervision_weights"]
