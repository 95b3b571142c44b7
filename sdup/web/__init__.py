"""``python -m sdup serve``: a local web page to upscale images and compare them with their input, on the command
line's own code path (its parser, checks, plan, run and writer), so a download equals the CLI's output.

* ``form``: the page's options from the CLI's parser and the upscaler's record; form -> arguments; staged uploads.
* ``runner``: the plan (the dry run) and the run (``run_all``) with the weights loaded once; ``ServerOptions``.
* ``jobs``: one job at a time (``JobQueue``), positions, progress and cancel (``Progress``, ``Cancelled``).
* ``compare``: the input scaled up for reference, the zoomed pair.
* ``handlers``: what the page's events do; ``app``: the Gradio layout; ``serve``: the command.

Only ``handlers``, ``app`` and ``serve`` import Gradio; nothing in the library imports this package.
"""
