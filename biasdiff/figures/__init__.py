"""Figures of the paper, drawn from pipeline summaries with matplotlib."""
