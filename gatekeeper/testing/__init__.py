"""Fakes and factories shipped with the package, for Gatekeeper's tests and for yours.

Each fake implements the same interface as the real thing and has tests of its own.
"""
