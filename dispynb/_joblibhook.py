"""joblib's backend name ``"dispynb"`` known after a plain ``import dispynb``.

joblib finds a backend by name only once it is registered, and registering ours
(`dispynb.joblib_backend`) imports joblib and the executor: too much for every
``import dispynb`` (a node loads this package too, and joblib may not be
installed). So `install` registers a small factory instead, and only when joblib
is loaded: at once if it is already, else when ``joblib.parallel`` is first
imported (a finder on `sys.meta_path` that only looks at that one name). The
factory imports the real backend at the first ``parallel_config(backend="dispynb")``
or ``Parallel(backend="dispynb")``, which then replaces it.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec
    from types import ModuleType

_BACKEND = "dispynb"
_MODULE = "joblib.parallel"  # where joblib keeps its backends
_finder: _JoblibFinder | None = None


def install() -> None:
    """Have joblib know ``"dispynb"``: now if joblib is loaded, else when it is."""
    global _finder
    module = sys.modules.get(_MODULE)
    if module is not None:
        _register(module)
        return
    # No lock: this runs under the import lock of ``dispynb`` (and threading is
    # not loaded yet).
    if _finder is None:
        _finder = _JoblibFinder()
        sys.meta_path.insert(0, _finder)


def _register(module: ModuleType) -> None:
    """Register the factory with the loaded ``joblib.parallel`` (unless the real
    backend is there already)."""
    if _BACKEND not in module.BACKENDS:
        module.register_parallel_backend(_BACKEND, _make_backend)


def _make_backend(**kwargs: Any) -> Any:
    """joblib's factory for ``"dispynb"``: the real backend, imported now."""
    try:
        from dispynb.joblib_backend import DispynbBackend
    except ImportError as exc:
        raise ImportError(
            f"joblib's backend 'dispynb' cannot load ({exc}): it needs joblib>=1.3 "
            "(pip install 'joblib>=1.3', or '.[joblib]' in dispynb's checkout)"
        ) from exc
    return DispynbBackend(**kwargs)


class _JoblibFinder:
    """A `sys.meta_path` finder that registers the backend once ``joblib.parallel``
    has run; it finds nothing itself and leaves once used."""

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != _MODULE:
            return None
        # Used once (this runs under the import lock of ``joblib.parallel``).
        global _finder
        _finder = None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec: ModuleSpec | None = None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec else None
            if spec is not None:
                break
        if spec is None or spec.loader is None:
            return spec  # not a module joblib could be: left to fail as it would
        if hasattr(spec.loader, "exec_module"):
            spec.loader = cast("Loader", _RegisteringLoader(spec.loader))
        else:  # an import hook's loader of the old protocol: load_module only
            spec.loader = cast("Loader", _RegisteringLegacyLoader(spec))
        return spec


class _RegisteringLoader:
    """``joblib.parallel``'s own loader, then the registration."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self._loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The module keeps its own loader, as if this one had never been there.
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _register(module)


class _RegisteringLegacyLoader:
    """``joblib.parallel``'s own loader of the pre-3.4 protocol (``load_module``
    only, as some import hooks still have), then the registration."""

    def __init__(self, spec: ModuleSpec) -> None:
        self._spec = spec
        self._loader = spec.loader

    def load_module(self, fullname: str) -> ModuleType:
        # The spec keeps its own loader, as if this one had never been there.
        self._spec.loader = self._loader
        module: ModuleType = self._loader.load_module(fullname)  # type: ignore[union-attr]
        if getattr(module, "__loader__", None) is None:
            module.__loader__ = self._loader
        _register(module)
        return module
