"""The signatures users read (the API reference, ``help()``, IPython's ``Name?``)
are those of the classes' constructors, not of a catch-all ``__new__``."""

from __future__ import annotations

import importlib
import inspect

import pytest
from dispynb_docs import public_names

from tests.docs.test_reference import PUBLIC_MODULES


def _public_classes() -> list[tuple[str, type]]:
    found = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in public_names(module):
            value = getattr(module, name)
            if inspect.isclass(value) and "__init__" in vars(value):
                found.append((f"{module_name}.{name}", value))
    return found


CLASSES = _public_classes()


def test_there_are_classes_to_check() -> None:
    assert any(name == "dispynb.LocalCluster" for name, _ in CLASSES)


@pytest.mark.parametrize("cls", [c for _, c in CLASSES], ids=[n for n, _ in CLASSES])
def test_a_class_shows_its_constructors_parameters(cls: type) -> None:
    """``LocalCluster.__new__(cls, *args, engine=None, **kwargs)`` picks the
    engine; the reference showed that instead of ``nodes``, ``cpus``, ``secret``..."""
    init = list(inspect.signature(cls.__init__).parameters.values())[1:]  # type: ignore[misc]
    shown = list(inspect.signature(cls).parameters.values())
    assert shown == init, f"{cls.__qualname__}{inspect.signature(cls)}"
