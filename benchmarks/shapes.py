"""Benchmark shapes: SD1.5 at 512 px (64x64 latents, batch B = 1, 2, 4) on GPU, a reduced set on CPU.

linear: (M tokens, in features, out features); conv2d: (batch, channels, spatial size), 3x3, stride 1, padding 1;
lora: (M, in, out, rank); unet: (batch, latent size, config name).
"""

_B = (1, 2, 4)
_WIDTHS = ((4096, 320), (1024, 640), (256, 1280))  # tokens per image and channels of the three attention levels

GPU = {
    "linear": [(t * b, c, c) for b in _B for t, c in _WIDTHS]  # attention projections
    + [(77 * b, 768, c) for b in _B for _, c in _WIDTHS]  # cross-attention K/V
    + [(t * b, c, 8 * c) for b in _B for t, c in _WIDTHS]  # feed-forward in (GEGLU: 2 x 4C)
    + [(t * b, 4 * c, c) for b in _B for t, c in _WIDTHS],  # feed-forward out
    "conv2d": [(b, c, s) for b in _B for s, c in ((64, 320), (32, 640), (16, 1280), (8, 1280))],
    "lora": [(t * b, c, c, r) for b in (1, 4) for t, c in _WIDTHS for r in (4, 16, 64)],
    "unet": [(1, 64, "sd15"), (4, 64, "sd15")],
}

CPU = {
    "linear": [(1024, 320, 320), (4096, 640, 640), (1024, 1280, 1280), (77, 768, 320)],
    "conv2d": [(1, 320, 32), (1, 640, 16), (1, 1280, 8)],
    "lora": [(1024, c, c, r) for c in (320, 1280) for r in (4, 16, 64)],
    "unet": [(1, 16, "tiny"), (4, 16, "tiny")],
}

QUICK = {"linear": [(64, 40, 48)], "conv2d": [(1, 8, 8)], "lora": [(64, 40, 48, 4)], "unet": [(1, 8, "micro")]}


def shape_sets(device_type: str, quick: bool) -> dict:
    return QUICK if quick else (GPU if device_type == "cuda" else CPU)
