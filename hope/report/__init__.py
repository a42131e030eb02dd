"""Docs-ready markdown tables and plots from the eval JSONs (``python -m hope.report <run_dirs...>``)."""
from hope.report.render import collect, render_markdown, render_plots

__all__ = ["collect", "render_markdown", "render_plots"]
