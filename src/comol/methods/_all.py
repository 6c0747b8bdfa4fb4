"""Imports every method module so that each registers itself. Add new methods here."""

from comol.methods import (
    adamole,  # noqa: F401
    comol,  # noqa: F401
    denselora,  # noqa: F401
    flylora,  # noqa: F401
    hydralora,  # noqa: F401
    mola,  # noqa: F401
    molora,  # noqa: F401
    smear,  # noqa: F401
    sparsemoa,  # noqa: F401
)
