"""Small diffusers models built from configs (random weights, no download)."""

import torch


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )


def unet_inputs(batch: int = 2, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    text = torch.randn(batch, 7, 32, generator=generator)
    return sample, timesteps, text
