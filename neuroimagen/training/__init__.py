"""Training: one ``fit()`` for every stage, checkpoints as self-describing directories, samplers.

Plain PyTorch: the same code runs in this process and inside Ray Train (``neuroimagen.distributed``),
behind two seams — a ``RunContext`` (rank, world size, device, DDP wrapping) and a ``Reporter``
(metrics + checkpoint out, latest checkpoint back in).
"""
