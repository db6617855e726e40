"""Data: readers for EEG-ImageNet and THINGS-EEG2, the synthetic twin, captions, Datasets.

The common entry points are loaded lazily (``from neuroimagen.data import load_splits``) so that
importing a submodule such as ``captions`` does not pull in torch.
"""

_LAZY = {"load_splits", "load_recording", "EEGDataset", "Recording", "load_image"}


def __getattr__(name):
    if name in _LAZY:
        from neuroimagen.data import datasets  # noqa: PLC0415 - lazy: `import neuroimagen.data.captions` stays light

        return getattr(datasets, name)
    raise AttributeError(f"module 'neuroimagen.data' has no attribute {name!r}")


__all__ = sorted(_LAZY)
