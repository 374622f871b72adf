"""ktpipe: Knowledge Transfer across modalities (Barbano et al.) as a reproducible pipeline."""

__version__ = "0.1.0"
