"""aicc: the AI capability center."""

__version__ = "0.1.0"
