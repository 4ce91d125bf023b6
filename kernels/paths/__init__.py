"""Which path a Triton call takes (a fixed policy, ``BAYESLAYERS_FUSION``, or timed on the GPU), and the fused
paths' host functions."""
