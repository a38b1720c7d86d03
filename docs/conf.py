"""Sphinx configuration for the sknvp documentation.

Build (warnings are errors, as in CI)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Set ``SKNVP_DOCS_FAST=1`` to run the gallery examples in their reduced mode (CI does), or
``SKNVP_DOCS_NO_GALLERY=1`` to skip running them altogether while editing prose.
Nothing here needs the internet: no intersphinx, no remote theme assets at build time.
"""

import importlib
import os
import re
import sys
import warnings
from pathlib import Path

import sknvp

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS))  # makes `conf.GalleryOrder` importable for sphinx-gallery

# -- Project -------------------------------------------------------------------------------------

project = "sknvp"
author = "sknvp developers"
copyright = "sknvp developers, BSD-3-Clause"
release = sknvp.__version__
version = ".".join(release.split(".")[:2])

# -- General -------------------------------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
]

# MathJax ships with the site when sphinx-mathjax-offline is installed (the `docs` extra
# installs it), so the built pages render formulas without a network; otherwise the pages
# load MathJax from its CDN when they are opened.
try:
    importlib.import_module("sphinx-mathjax-offline")
    extensions.append("sphinx-mathjax-offline")
except ImportError:
    pass

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = [
    "_build",
    "Thumbs.db",
    ".DS_Store",
    "auto_examples/*.ipynb",
    "auto_examples/*.py",
    "auto_examples/*.zip",
    "auto_examples/*.json",
    "**/README.md",  # folder notes are not pages
    "figures/**",  # figures and the tables generated next to them are assets, not pages
]
default_role = "literal"
toc_object_entries_show_parents = "hide"  # "fit()" rather than "RealNVPDensity.fit()" in page TOCs
pygments_style = "sphinx"

# -- API reference: autodoc + autosummary + numpydoc ---------------------------------------------

autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "none"  # numpydoc docstrings carry the types
numpydoc_show_class_members = False  # members are listed by the class template instead
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True
numpydoc_xref_param_type = False

# -- Markdown pages (myst) -----------------------------------------------------------------------

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# -- Example gallery (sphinx-gallery) ------------------------------------------------------------


class GalleryOrder:
    """Gallery order: a reader's path from first contact to the long study, then the rest."""

    FIRST = (
        "plot_two_moons.py",
        "plot_grid_search.py",
        "plot_novelty_detection.py",
        "plot_data_augmentation.py",
        "plot_datasets.py",
        "plot_digits.py",
        "plot_out_of_core.py",
        "plot_study_overview.py",
    )

    def __init__(self, src_dir):
        self.src_dir = src_dir

    def __call__(self, filename):
        name = os.path.basename(filename)
        rank = self.FIRST.index(name) if name in self.FIRST else len(self.FIRST)
        return f"{rank:03d}_{name}"

    def __repr__(self):  # sphinx-gallery hashes the config through repr()
        return "GalleryOrder"


# The examples' reduced mode is SKNVP_DOCS_FAST=1 (README.txt of the gallery says so).
# plot_digits.py reads SKNVP_EXAMPLE_FAST instead; forward the flag until it reads ours.
if os.environ.get("SKNVP_DOCS_FAST") == "1":
    os.environ.setdefault("SKNVP_EXAMPLE_FAST", "1")

# sphinx-gallery never defines __file__ (it runs examples with exec). An example that uses it
# cannot run in the gallery; it is left out, with a note in the build log, until it does not.
_EXAMPLES = DOCS.parent / "examples"
_NEEDS_FILE = sorted(p.name for p in _EXAMPLES.glob("plot_*.py") if "__file__" in p.read_text())
_IGNORE = r"__init__\.py|demo_" + "".join(f"|{re.escape(name)}" for name in _NEEDS_FILE)

_WARNING_FILTERS = list(warnings.filters)


def reset_warnings(gallery_conf, fname):
    """Give every example the warning filters of a fresh process (examples may change them)."""
    warnings.filters[:] = _WARNING_FILTERS


sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",  # every plot_*.py runs; its figures and output are shown
    "ignore_pattern": _IGNORE,  # the README's demo script is not a gallery page
    "within_subsection_order": "conf.GalleryOrder",
    "plot_gallery": os.environ.get("SKNVP_DOCS_NO_GALLERY", "0") != "1",
    "download_all_examples": False,
    "reference_url": {"sknvp": None},  # link names in example code to the API pages
    "doc_module": ("sknvp",),
    "backreferences_dir": "gen_modules/backreferences",
    "image_scrapers": ("matplotlib",),
    "reset_modules": ("matplotlib", "conf.reset_warnings"),
    "capture_repr": ("_repr_html_", "__repr__"),
    "remove_config_comments": True,
    "min_reported_time": 1,
    "show_memory": False,
}

# -- HTML ----------------------------------------------------------------------------------------

html_theme = "pydata_sphinx_theme"
html_title = f"sknvp {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_show_sourcelink = False
html_theme_options = {
    "logo": {"text": "sknvp"},
    "navbar_align": "left",
    "header_links_before_dropdown": 4,
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "secondary_sidebar_items": ["page-toc", "sg_download_links", "sg_launcher_links"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_sidebars = {"index": [], "install": [], "auto_examples/index": []}
html_context = {"default_mode": "light"}

# -- Members inherited from scikit-learn's machinery ---------------------------------------------
# get_metadata_routing, set_{method}_request and set_output come from scikit-learn's mixins;
# their docstrings point into scikit-learn's own glossary and user guide, which this site does
# not have. They work as documented by scikit-learn; the pages list get_params, set_params,
# fit_transform and the estimator's own methods.

_SKLEARN_MACHINERY = re.compile(r"^(get_metadata_routing|set_output|set_\w+_request)$")


def _skip_sklearn_machinery(app, what, name, obj, skip, options):
    return True if _SKLEARN_MACHINERY.match(name) else None


# -- Temporary docstring fixes --------------------------------------------------------------------
# Two docstrings in lead-owned modules trip docutils; exact replacements applied at build time
# until the sources change (then these become no-ops and can go):
# * RealNVPDensity: "(n_features_in_,)" reads as a link target; sklearn writes (`n_features_in_`,).
# * nets.MLP: the summary "``in_features -> hidden... -> out_features``" is cut at "... " by
#   autosummary, leaving an unclosed literal.
_DOCSTRING_FIXES = {
    "of shape (n_features_in_,)": "of shape (`n_features_in_`,)",
    "``in_features -> hidden... -> out_features``": "``in_features -> hidden -> out_features``",
}


def _fix_docstrings(app, what, name, obj, options, lines):
    for i, line in enumerate(lines):
        for old, new in _DOCSTRING_FIXES.items():
            line = line.replace(old, new)
        lines[i] = line


# -- Pages written in parallel by other contributors ---------------------------------------------
# Until a page exists it is left out of the top-level toctree, so the build does not fail on a
# missing document. Once all of them exist this block and the hook below can go.

OPTIONAL_PAGES = ("reproduction", "datasets", "images", "reliability", "scale_out", "benchmarks")
_DOC_ROLE = re.compile(r":doc:`(?:([^`<]*?)\s*<([^`>]+)>|([^`<]+))`")
_GALLERY_REF = re.compile(r":ref:`(?:[^`<]*?<)?sphx_glr_auto_examples_(\w+)\.py>?`")


def _missing_pages():
    return [p for p in OPTIONAL_PAGES if not any((DOCS / f"{p}{s}").exists() for s in source_suffix)]


def _present_examples():
    return {p.stem for p in _EXAMPLES.glob("plot_*.py") if p.name not in _NEEDS_FILE}


def _unlink_missing(source, missing_pages, present_examples):
    """Turn links to pages or examples that do not exist yet into plain text."""

    def doc(match):
        title, target, bare = match.groups()
        name = (target or bare).strip().rsplit("/", 1)[-1]
        if name not in missing_pages:
            return match.group(0)
        return f"*{title or name}* (page in preparation)"

    def example(match):
        name = match.group(1)
        return match.group(0) if name in present_examples else f"``examples/{name}.py``"

    return _GALLERY_REF.sub(example, _DOC_ROLE.sub(doc, source))


def _drop_missing_pages(app, docname, source):
    missing = _missing_pages()
    text = _unlink_missing(source[0], missing, _present_examples())
    if docname == "index" and missing:
        lines = text.splitlines(keepends=True)
        text = "".join(line for line in lines if line.strip() not in missing)
    source[0] = text


def setup(app):
    missing = _missing_pages()
    if missing:
        print(f"sknvp docs: pages not written yet, left out of the toctree: {missing}")
    if _NEEDS_FILE:
        print(f"sknvp docs: examples using __file__, left out of the gallery: {_NEEDS_FILE}")
    app.connect("source-read", _drop_missing_pages)
    app.connect("autodoc-skip-member", _skip_sklearn_machinery)
    app.connect("autodoc-process-docstring", _fix_docstrings)
