"""Vendored copies of the MUTAG and Cora data sets, read by :mod:`graphinfer.models.datasets`.

DATA.md at the repository root gives their sources, citations, terms and checksums.
"""
