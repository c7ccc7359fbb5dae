"""busynth: does synthetic training data help a breast-ultrasound classifier?"""

__version__ = "0.1.0"
