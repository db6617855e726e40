"""neuroimagen: reconstruct the images a person saw from their EEG (NeuroImagen, Lan et al. 2023).

Importing the package is cheap: torch, Ray and the model libraries load only where they are used.
"""

__version__ = "0.1.0"

from neuroimagen.errors import ConfigError, DataError, NeuroimagenError, OutputError

__all__ = ["ConfigError", "DataError", "NeuroimagenError", "OutputError", "__version__"]
