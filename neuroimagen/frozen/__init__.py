"""Frozen components of stage 4 that the embedded default trains itself: the tiny latent diffusion model
(:mod:`neuroimagen.frozen.ldm`) and the judge classifier (:mod:`neuroimagen.frozen.judge`).

Both are trained once on the training images and cached by a content hash of everything that determines
them; their modules and save/load live in ``neuroimagen.models.ldm`` and ``neuroimagen.models.classifier``.
"""
