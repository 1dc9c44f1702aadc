"""Active Memory Manager policies and a scheduler plugin for Dask.

Imports only dask and distributed, so that it fits into any scheduler image.
"""
