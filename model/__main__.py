"""``python -m model``: the ``minituring`` command (fill-mask, summarize, evaluate, plot a run
folder). Its code sits a layer above ``model/`` (``trainer/cli.py``), since ``evaluate`` needs
the data pipeline; this entry point is the one file of ``model/`` that reaches up, and no
module of ``model/`` imports it."""

import sys

from trainer.cli import main

sys.exit(main(prog="python -m model"))
