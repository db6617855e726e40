"""neuroimagen: reconstruct the images a person saw from their EEG (NeuroImagen, Lan et al. 2023).

Importing the package is cheap: torch, Ray and the model libraries load only where they are used.
"""

__version__ = "0.1.0"

from neuroimagen.errors import ConfigError, DataError, NeuroimagenError, OutputError

__all__ = ["ConfigError", "DataError", "NeuroimagenError", "OutputError", "Run", "__version__"]


def __getattr__(name: str):
    """``neuroimagen.Run`` (the Python API, :mod:`neuroimagen.api`), imported on first use: importing the package
    stays cheap, and no module below the API imports it."""
    if name == "Run":
        from neuroimagen.api import Run  # noqa: PLC0415 - lazy on purpose (see above)

        return Run
    raise AttributeError(f"module 'neuroimagen' has no attribute {name!r}")
