"""Generators: every method of the study behind one interface (see base.py).

The methods themselves (names, classes, order) are listed in :mod:`busynth.registry`; a
generator's module is imported only when its class is asked for (:func:`generator_class`).
"""

from busynth.generators.base import (
    Generator,
    Synthetic,
    build_generator,
    generator_class,
)
from busynth.registry import available_methods, order_methods

__all__ = ["Generator", "Synthetic", "available_methods", "build_generator", "generator_class", "order_methods"]
