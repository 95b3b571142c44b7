"""``python -m sdup serve``: the upscale-and-compare page on 127.0.0.1 (another address only when asked, with a
warning).  The weights are checked at start (the CLI's one-line message) and loaded on the first job; Gradio is
imported here only, with its analytics off and nothing fetched from outside."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from ..cli.arguments import MODELS, Parser, fail
from .runner import WEB_MAX_PIXELS, WEB_MAX_UPLOAD_MB, Runner, ServerOptions

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "GRADIO_SSR_MODE": "False", "DO_NOT_TRACK": "1"}


def build_parser(prog: str = "python -m sdup serve") -> Parser:
    p = Parser(prog=prog, description="A local web page to upscale images and compare them with their input.")
    p.add_argument("--weights", required=True, help="checkpoint file or diffusers folder (as for upscale)")
    p.add_argument("--config", help="upstream YAML for non-standard checkpoints")
    p.add_argument("--vae", metavar="PATH", help="x2 / stablesr: the extra VAE (as for upscale)")
    p.add_argument("--model", choices=MODELS, default="auto", help="which upscaler (default: from the checkpoint)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; another one opens the page "
                        "and its GPU to the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--max-pixels", type=int, default=WEB_MAX_PIXELS, metavar="N",
                   help=f"refuse uploaded images above N pixels (default {WEB_MAX_PIXELS:,})")
    p.add_argument("--max-upload-mb", type=float, default=WEB_MAX_UPLOAD_MB, metavar="MB",
                   help=f"refuse uploads above MB megabytes (default {WEB_MAX_UPLOAD_MB:g})")
    p.add_argument("--workdir", help="where uploads and outputs are kept (default: a new temporary folder)")
    return p


def check(args) -> None:
    if not 0 < args.port < 65536:
        fail(f"--port must be in 1..65535, got {args.port}")
    if args.max_pixels <= 0 or args.max_upload_mb <= 0:
        fail("--max-pixels and --max-upload-mb must be > 0 (the page always limits uploads)")
    if args.host not in LOCAL_HOSTS:
        print(f"warning: serving on {args.host}:{args.port}: anyone who can reach this machine can use the page "
              "and its accelerator (the default, 127.0.0.1, is this machine only)", file=sys.stderr)


def serve_main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    check(args)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sdup-serve-"))
    options = ServerOptions(args.weights, args.config, args.vae, args.model, args.device, args.max_pixels,
                            args.max_upload_mb, workdir)
    runner = Runner(options)  # the weights checked now: the CLI's message, before any page is served
    workdir.mkdir(parents=True, exist_ok=True)
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(workdir / "uploads"))
    from .app import CSS, build, theme  # Gradio only now
    from .handlers import Page
    from .jobs import JobQueue
    demo = build(Page(runner, JobQueue(runner.run)),
                 f"the **{runner.upscaler.name}** upscaler, weights `{Path(args.weights).name}`; one job at a time")
    print(f"sdup serve: http://{args.host}:{args.port} (uploads and outputs in {workdir})", flush=True)
    demo.queue(default_concurrency_limit=None).launch(
        server_name=args.host, server_port=args.port, share=False, inbrowser=False, show_error=False,
        max_file_size=int(args.max_upload_mb * 2**20), allowed_paths=[str(workdir)], footer_links=[],
        ssr_mode=False, theme=theme(), css=CSS,
        quiet=True)
    return 0
