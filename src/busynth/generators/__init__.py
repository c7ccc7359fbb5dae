"""Generators: every method of the study behind one interface (see base.py)."""

from busynth.generators.base import (
    Generator,
    Synthetic,
    available_methods,
    build_generator,
    generator_class,
    register,
)


def _classical():
    from busynth.generators.classical import ClassicalAugmenter

    return ClassicalAugmenter


def _cvae():
    from busynth.generators.cvae import CVAEGenerator

    return CVAEGenerator


register("classical", _classical)
register("cvae", _cvae)

__all__ = ["Generator", "Synthetic", "available_methods", "build_generator", "generator_class", "register"]
