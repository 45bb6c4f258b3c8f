"""Sphinx configuration of the dispynb documentation site (``./dev docs``).

Offline by design: no intersphinx inventories, no CDN scripts (ipywidgets' and
require.js' loaders are turned off), the Furo theme ships its own assets. The
tutorials are notebooks/*.ipynb (through the ``notebooks`` symlink), executed on every
build with a time limit per cell, so every output shown is real; a notebook that needs
other machines (SSH hosts) shows the outputs stored from its last run against them.
"""

from __future__ import annotations

import glob
import json
import os
import sys

sys.path.insert(0, os.path.abspath("_ext"))
sys.path.insert(0, os.path.abspath(".."))

from dispynb import __version__

project = "dispynb"
author = "the dispynb developers"
copyright = "dispynb developers"
version = release = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_nb",
    "dispynb_docs",
]

exclude_patterns = [
    "_build",
    "_ext",
    "**/.ipynb_checkpoints",
    "notebooks/conftest.py",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

# `name` in docstrings links to the Python object when it can.
default_role = "py:obj"
nitpicky = False

# -- autodoc: docstrings are numpy style; signatures keep their type hints ------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "undoc-members": False}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
# "Attributes" sections as fields: autodoc documents the attributes themselves.
napoleon_use_ivar = True

# -- MyST and MyST-NB ------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = os.environ.get("DISPYNB_DOCS_EXECUTE", "force")


def _needs_machines(path: str) -> bool:
    """A notebook that needs machines the build does not have (its metadata names
    the variable pointing at them, notebooks/conftest.py): shown with the outputs it
    stored from its last run there, not executed, unless that variable is set."""
    with open(path, encoding="utf-8") as handle:
        needs = json.load(handle).get("metadata", {}).get("dispynb", {})
    variable = needs.get("requires_env")
    return bool(variable) and not os.environ.get(variable)


nb_execution_excludepatterns = [
    f"notebooks/{os.path.basename(path)}"
    for path in sorted(
        glob.glob(os.path.join(os.path.dirname(__file__), "notebooks", "*.ipynb"))
    )
    if _needs_machines(path)
]
nb_execution_timeout = 45  # seconds per cell, as nbval's --nbval-cell-timeout
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
# Offline: no ipywidgets/require.js loaders from a CDN. Widgets show their static
# fallback (the text or HTML the kernel sent with them).
nb_ipywidgets_js = {}
nb_mime_priority_overrides = [
    ("html", "application/vnd.jupyter.widget-view+json", None),
    ("dirhtml", "application/vnd.jupyter.widget-view+json", None),
]

# -- HTML ------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"dispynb {release}"
html_static_path = ["_static"]
html_css_files = ["dispynb.css"]
html_show_sourcelink = False
html_copy_source = False
