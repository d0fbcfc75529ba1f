"""Sphinx configuration of the hypergrad documentation site.

Build it (warnings as errors, as ``.ci/run`` does)::

    pip install -e ".[docs]"
    sphinx-build -W --keep-going -q -b html docs docs/_build/html

myst-nb executes every notebook under ``docs/notebooks/`` and every page with ``{code-cell}``
blocks during the build, so the Python shown on the site is the Python that ran.
"""

import os

# The pages' and notebooks' kernels inherit this environment. XLA compiles them as it
# compiles a user's program (no lighter optimization level), so the printed outputs are
# the ones a reader gets.
os.environ.setdefault("PYTHONWARNINGS", "ignore")

import hypergrad  # noqa: E402

project = "hypergrad"
author = "the hypergrad authors"
copyright = "the hypergrad authors"  # noqa: A001
release = hypergrad.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# Only pages are documents: the build output, myst-nb's executed copies and the figures
# (images the pages include) are not.
exclude_patterns = ["_build", "jupyter_execute", "figures", "**.ipynb_checkpoints",
                    "Thumbs.db", ".DS_Store"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

# MyST: anchors for the headings (links like page.md#a-heading), $math$, ::: fences.
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 4

# myst-nb: run every notebook and code-cell page at each build, fail on any error.
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_timeout = 300
nb_execution_show_tb = True
nb_merge_streams = True

# autodoc: the docstrings use reST roles (:func:, :class:) already.
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "none"
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True

html_theme = "sphinx_book_theme"
html_title = f"hypergrad {release}"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_static_path: list[str] = []
