"""Benchmark shapes: SD1.5 at 512 px (batch 1, 2, 4) on GPU, a reduced set on CPU.

linear: (M tokens, N out, K in); conv2d: (batch, channels, spatial size); lora: (M, N, K, rank).
"""

GPU = {
    "linear": [(t * b, c, c) for b in (1, 2, 4) for t, c in ((4096, 320), (1024, 640), (256, 1280))]
    + [(77 * b, c, 768) for b in (1, 4) for c in (320, 640, 1280)]
    + [(t * b, 8 * c, c) for b in (1, 4) for t, c in ((4096, 320), (1024, 640), (256, 1280))]
    + [(t * b, c, 4 * c) for b in (1, 4) for t, c in ((4096, 320), (1024, 640), (256, 1280))],
    "conv2d": [(b, c, s) for b in (1, 4) for s, c in ((64, 320), (32, 640), (16, 1280), (8, 1280))],
    "lora": [(4096 * b, 320, 320, r) for b in (1, 4) for r in (4, 16, 64)]
    + [(256 * b, 1280, 1280, r) for b in (1, 4) for r in (4, 16, 64)],
}

CPU = {
    "linear": [(1024, 320, 320), (4096, 640, 640), (1024, 1280, 1280)],
    "conv2d": [(1, 64, 32), (1, 128, 16)],
    "lora": [(1024, 320, 320, r) for r in (4, 16, 64)],
}

QUICK = {"linear": [(64, 48, 40)], "conv2d": [(1, 8, 8)], "lora": [(64, 48, 40, 4)]}
