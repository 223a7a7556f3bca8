"""The ``rmsg`` command-line tool (click).

The library is :mod:`reliable`; the fault shim is :mod:`netem`.
"""
