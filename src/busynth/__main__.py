"""``python -m busynth`` (and ``accelerate launch -m busynth``) runs the command line."""

from busynth.cli import app

app(prog_name="busynth")
