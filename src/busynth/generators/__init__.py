"""Generators: every method of the study behind one interface (see base.py)."""

from busynth.generators.base import (
    Generator,
    Synthetic,
    available_methods,
    build_generator,
    generator_class,
    order_methods,
    register,
)


def _classical():
    from busynth.generators.classical import ClassicalAugmenter

    return ClassicalAugmenter


def _cvae():
    from busynth.generators.cvae import CVAEGenerator

    return CVAEGenerator


def _sd_lora():
    from busynth.generators.diffusion.sd_lora import SDLoraGenerator

    return SDLoraGenerator


def _controlnet():
    from busynth.generators.diffusion.controlnet import ControlNetGenerator

    return ControlNetGenerator


register("classical", _classical)
register("cvae", _cvae)
register("sd-lora", _sd_lora)
# controlnet builds on the same fold's sd-lora fit when sd-lora is in the run: sd-lora runs first.
register("controlnet", _controlnet, after=("sd-lora",))

__all__ = ["Generator", "Synthetic", "available_methods", "build_generator", "generator_class", "order_methods",
           "register"]
