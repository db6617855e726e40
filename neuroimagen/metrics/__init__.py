"""Metrics: pure functions (tensors in, floats out), each tested against an independent computation."""
