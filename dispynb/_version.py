"""The single source of dispynb's version."""

__version__ = "0.1.0"


def version_line(program: str) -> str:
    """What ``PROGRAM --version`` prints: ``dispynb-node 0.1.0``."""
    return f"{program} {__version__}"


def answered_version(program: str, argv: list[str]) -> bool:
    """Whether ``argv`` (the arguments) is just ``--version``, then printed: a
    daemon answers it before importing its option parser's modules (a quarter of a
    second, more on a loaded machine)."""
    if argv != ["--version"]:
        return False
    print(version_line(program))
    return True
