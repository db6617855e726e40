"""Reconstruct: Decode -> Generate -> Score in one callable, a batch's whole journey in one process."""

from __future__ import annotations

from neuroimagen.reconstruction.decode import Decode
from neuroimagen.reconstruction.generate import Generate
from neuroimagen.reconstruction.score import Score


class Reconstruct:
    """Rows -> scored rows. The local loop runs it, and so does every actor of Ray Data's ``fused`` layout (the
    batch never crosses the object store between steps, and no two actors compete for the same cores)."""

    def __init__(self, decode: Decode, generate: Generate, score: Score):
        self.decode, self.generate, self.score = decode, generate, score

    def __call__(self, batch: dict) -> dict:
        return self.score(self.generate(self.decode(batch)))
