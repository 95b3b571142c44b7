"""``python -m sdup``: Ctrl-C / SIGTERM end in one line from the start (``fileio.run_main``)."""
from .fileio import hold_stop_signals, run_main

hold_stop_signals()


def _load():
    from .cli import main
    return main


run_main(_load)
