"""The command line: ``python -m sdup`` (inspect, convert, upscale) and ``scripts/upscale.py`` (= ``python -m sdup
upscale``).

* ``commands``: the ``python -m sdup`` entry (inspect, convert; upscale hands over to ``upscale``).
* ``arguments``: the upscale arguments and the checks that need no weights (``fail``: one line, exit code 2).
* ``inputs``: which inputs (files, folders, globs, latents files) and which outputs.
* ``planning``: which upscaler (``sdup.pipelines.registry.UPSCALERS``), its settings, each input's ``TilePlan``,
  the dry run.
* ``running``: loading, the loop (prepare -> sample -> finish -> write), torchrun.
* ``provenance``: the parameters an output records, and ``--rerun``.

No upscaler is named here: everything model-specific comes from its ``Upscaler`` record.
"""
from .commands import main
from .upscale import cmd_upscale, upscale_main

__all__ = ["main", "upscale_main", "cmd_upscale"]
