"""natrio's version, read by the build backend and reported in the worker directory."""

__version__ = "0.1.0"
