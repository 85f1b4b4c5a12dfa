"""``python -m model``: fill-mask, summarize, evaluate and plot a trained run folder."""

import sys

from model.cli import main

sys.exit(main(prog="python -m model"))
