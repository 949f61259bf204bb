"""Sphinx configuration for the mailoutbox documentation."""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "src")))
# Local extensions: cliref renders the mailoutbox command's reference.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "_ext")))

project = "mailoutbox"
author = "The mailoutbox developers"
copyright = "2026, The mailoutbox developers"  # noqa: A001
release = "0.1.0.dev0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "repoze.sphinx.autointerface",
    "cliref",
]
intersphinx_mapping = {}
autodoc_member_order = "bysource"
nitpicky = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path = ["_static"]
