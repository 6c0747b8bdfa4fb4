"""Imports every method module so that each registers itself. Add new methods here."""

from comol.methods import comol  # noqa: F401
