"""The backbones the method trainers wrap, built from the joint plans' configuration (one place for Hermes and
U-Harmony): the planned nnU-Net network as is, or a ``ResidualEncoderUNet`` with the plan's stages, features,
strides, kernels and decoder convolutions and nnU-Net ResEnc-M residual blocks per encoder stage."""
from __future__ import annotations

from torch import nn

#: nnU-Net ResEnc-M residual blocks per encoder stage (``nnUNetPlannerResEncM``), truncated to the stages
RESENC_M_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6)
RESENC_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def planned_backbone(configuration_manager, num_input_channels: int, num_output_channels: int,
                     enable_deep_supervision: bool) -> nn.Module:
    """The joint plan's own network (``PlainConvUNet`` as planned, or whatever the plans name)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    cm = configuration_manager
    return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                  cm.network_arch_init_kwargs_req_import, num_input_channels,
                                  num_output_channels, allow_init=True, deep_supervision=enable_deep_supervision)


def resenc_backbone(configuration_manager, num_input_channels: int, num_output_channels: int,
                    enable_deep_supervision: bool) -> nn.Module:
    """A ``ResidualEncoderUNet`` on the joint plan's topology with ResEnc-M blocks per stage (the last count
    repeated beyond 12 stages); a plan that already is a ResidualEncoderUNet is used as is."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    cm = configuration_manager
    kwargs = dict(cm.network_arch_init_kwargs)
    if cm.network_arch_class_name.split(".")[-1] != "ResidualEncoderUNet":
        n = int(kwargs["n_stages"])
        kwargs.pop("n_conv_per_stage", None)
        kwargs["n_blocks_per_stage"] = [RESENC_M_BLOCKS[min(i, len(RESENC_M_BLOCKS) - 1)] for i in range(n)]
    return get_network_from_plans(RESENC_CLASS, kwargs, cm.network_arch_init_kwargs_req_import,
                                  num_input_channels, num_output_channels, allow_init=True,
                                  deep_supervision=enable_deep_supervision)
