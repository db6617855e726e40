"""Stage 4, reconstruction: trained stages + frozen latent diffusion -> scored images. No training code here.

One *row* is one generated image: (subject, variant, test EEG trial, sample). :mod:`~.rows` lists them in a
fixed order, each row carrying its variant's choices; three plain callables turn batches of rows (``dict``
of numpy arrays, the Ray Data batch format) into scored images, and run unchanged in a loop
(``eval.backend=local``, tests) or as Ray Data actors (``neuroimagen.distributed.data``):

    Decode    (decode.py)    EEG -> f_theta(x) -> saliency map G(z, f) (z seeded per row), and the prompt
                             embedding (stage-3 regressor on label or per-image captions, the true caption,
                             or the empty caption)
    Generate  (generate.py)  init image + prompt embedding -> frozen LDM: img2img from the (upsampled) init
                             image, or text-to-image from pure noise; one generator per row, seeded per row
    Score     (score.py)     the injected classifier's probabilities, N-way hits, SSIM; PNGs through an
                             optional image writer (images.py)
    Reconstruct (reconstruct.py) the three in one callable

Each callable is built from loaded components (modules, pipeline, classifier, plain settings) and reads no
path in its constructor; :mod:`~.factory` loads the components of a run directory from its typed config
and builds them (what the local loop and the Ray actors call).
"""
