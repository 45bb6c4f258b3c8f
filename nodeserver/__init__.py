"""The dispynb node server: runs jobs of authenticated clients on its CPUs."""

from __future__ import annotations

from dispynb._version import __version__

__all__ = ["__version__"]
