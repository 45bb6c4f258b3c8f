"""A module the computation imports on the node: sent with ``depends=[helpers]``."""

SCALE = 3


def scale(x):
    return SCALE * x
