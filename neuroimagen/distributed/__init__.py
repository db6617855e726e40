"""The only package that imports Ray: Train (DDP stages), Tune (sweeps), Data (reconstruction at scale).

Everything here wraps plain-PyTorch code from the core; nothing in the core imports this package.
"""
