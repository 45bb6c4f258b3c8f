"""Tell a user's file named like a package dispynb needs from the package itself.

A ``msgpack.py`` or ``cloudpickle.py`` beside a script or notebook comes first on
``sys.path`` (the script's directory leads it), so ``import msgpack`` took it, and
dispynb failed later with ``AttributeError: module 'msgpack' has no attribute
'Packer'``, which names neither the file nor the fix.
"""

from __future__ import annotations

import types

from dispynb.errors import ShadowedPackageError

__all__ = ["require"]


def require(module: types.ModuleType, attribute: str) -> None:
    """Raise `ShadowedPackageError` naming ``module``'s file if it lacks
    ``attribute`` (one every version of the real package has)."""
    if hasattr(module, attribute):
        return
    where = getattr(module, "__file__", None) or repr(module)
    name = module.__name__
    error = ShadowedPackageError(
        f"{where} was imported as {name}, a package dispynb needs, because its "
        "directory comes first on sys.path: rename that file, or move it out of "
        "that directory"
    )
    error.name, error.path = name, where
    raise error
