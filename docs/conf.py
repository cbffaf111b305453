"""Sphinx configuration for natrio's documentation (MyST markdown pages, autodoc API).

Build with warnings as errors::

    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys

# natrio is normally installed (editable) in the environment that builds the docs; fall
# back to the source tree so a plain checkout builds too.
_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
try:
    import natrio
except ImportError:  # pragma: no cover - only without an installed natrio
    sys.path.insert(0, os.path.abspath(_SRC))
    import natrio

project = "natrio"
author = "natrio developers"
copyright = "natrio developers"  # noqa: A001 - Sphinx's name for it
release = natrio.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]
# No intersphinx: the docs must build without network access.

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "requirements.txt"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = False
# Keep middleware signatures readable: show the aliases, not what they expand to.
autodoc_type_aliases = {
    "Next": "natrio.middleware.Next",
    "Middleware": "natrio.middleware.Middleware",
    "Observer": "natrio.middleware.Observer",
}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"natrio {release}"
