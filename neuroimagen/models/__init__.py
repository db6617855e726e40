"""Models: one model per file, tensors in and tensors out; no I/O, configs or Ray."""
