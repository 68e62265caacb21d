"""Moved to :mod:`nnharmony.benchmark`; this import path stays for scripts that read ``own_peak_rss_mb`` here."""
from nnharmony.benchmark.runner import own_peak_rss_mb

__all__ = ["own_peak_rss_mb"]
