"""The single source of dispynb's version."""

__version__ = "0.1.0"
