"""The page's layout (Gradio Blocks) and its events; what the events do is ``handlers.Page``.

Left: the uploads, the prompts, the upscaler's options (``form.fields``: what its record takes), the plan, Upscale /
Cancel and the status line (queue position, progress, the one-line message).  Right: the result chosen, before/after
(a slider; before = the input scaled up by bicubic or nearest), the same corner of both zoomed, the parameters, and
the PNGs to download.  Element ids ``sdup-*`` are what the browser tests look for.
"""
from __future__ import annotations

import uuid

import gradio as gr

from .compare import REFERENCES, ZOOMS
from .form import DEFAULT, PROMPT_KINDS, Field, shown_default
from .handlers import Page, note
from .runner import KEEP_S

CSS = """
.sdup-error { color: #b00020; font-weight: 600; }
#sdup-progress { width: 60%; vertical-align: middle; }
#sdup-crops img { image-rendering: pixelated; }
"""


def theme():
    """The default theme on the system's fonts (the stock one fetches web fonts: the page makes no outside call)."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def component(upscaler, f: Field):
    """The form control of one option: a dropdown for choices, else a text field (empty: the upscaler's default,
    shown greyed; what is typed goes to the CLI's parser as typed)."""
    eid = f"sdup-opt-{f.dest.replace('_', '-')}"
    info = f.help if len(f.help) < 160 else f.help[:157] + "..."
    if f.choices:
        choices = list(f.choices) if f.default is not None else [DEFAULT, *f.choices]
        return gr.Dropdown(choices, value=f.default or DEFAULT, label=f.label, info=info, elem_id=eid)
    value = "" if f.default is None else str(f.default)
    return gr.Textbox(value=value, placeholder=shown_default(upscaler, f), label=f.label, info=info, elem_id=eid,
                      max_lines=1, min_width=120)


def inputs_column(page: Page):
    """The left column; returns (files, the form's controls in ``Page.request`` order, run, cancel, plan,
    status)."""
    files = gr.File(label=f"images ({', '.join(e[1:] for e in page.allowed)})", file_count="multiple",
                    file_types=list(page.allowed), elem_id="sdup-files")
    with gr.Row():
        prompt = gr.Textbox(label="prompt", elem_id="sdup-prompt", scale=3)
        prompt_kind = gr.Radio(list(PROMPT_KINDS), value=PROMPT_KINDS[0], label="prompt as", scale=1)
    with gr.Row():
        negative = gr.Textbox(label="negative prompt", elem_id="sdup-negative", scale=3)
        negative_kind = gr.Radio(list(PROMPT_KINDS), value=PROMPT_KINDS[0], label="negative as", scale=1)
    with gr.Accordion(f"{page.runner.upscaler.name} options (empty: the model's default)", open=True):
        with gr.Row():
            opts = [component(page.runner.upscaler, f) for f in page.fields]
    plan = gr.HTML(note("upload one or more images to see the plan"), elem_id="sdup-plan")
    with gr.Row():
        run = gr.Button("Upscale", variant="primary", elem_id="sdup-run")
        cancel = gr.Button("Cancel", variant="stop", elem_id="sdup-cancel")
    status = gr.HTML(elem_id="sdup-status")
    return files, [prompt, prompt_kind, negative, negative_kind, *opts], run, cancel, plan, status


def results_column():
    """The right column; returns (which, the view controls, slider, crops, parameters, download)."""
    which = gr.Dropdown([], label="result", elem_id="sdup-which")
    ref = gr.Radio(list(REFERENCES), value=REFERENCES[0], label="before: the input scaled up by", elem_id="sdup-ref")
    slider = gr.ImageSlider(label="before / after", format="png", type="pil", elem_id="sdup-compare")
    with gr.Row():
        cx = gr.Slider(0, 1, 0.5, step=0.01, label="zoom centre x", elem_id="sdup-cx")
        cy = gr.Slider(0, 1, 0.5, step=0.01, label="zoom centre y", elem_id="sdup-cy")
        zoom = gr.Radio(list(ZOOMS), value=ZOOMS[1], label="zoom", elem_id="sdup-zoom")
    crops = gr.Image(label="zoomed: before | after", format="png", type="pil", interactive=False, height=320,
                     elem_id="sdup-crops")
    params = gr.JSON(label="parameters (stored in the PNG)", elem_id="sdup-params")
    download = gr.File(label="download: PNG with its parameters", file_count="multiple", interactive=False,
                       elem_id="sdup-download")
    return which, [ref, cx, cy, zoom], slider, crops, params, download


def build(page: Page, title: str) -> gr.Blocks:
    with gr.Blocks(title="sdup: upscale and compare", delete_cache=(3600, KEEP_S)) as demo:
        gr.Markdown(f"## sdup: upscale and compare\n{title}")
        uploads, outputs = gr.State([]), gr.State([])
        session = gr.State(lambda: uuid.uuid4().hex)  # this tab's jobs (what Cancel cancels)
        with gr.Row():
            with gr.Column(scale=2):
                files, form, run, cancel, plan, status = inputs_column(page)
            with gr.Column(scale=3):
                which, view, slider, crops, params, download = results_column()
        quick = dict(concurrency_limit=None, show_progress="hidden")
        files.change(page.stage, [files, *form], [uploads, plan], **quick)
        gr.on([c.change for c in form], page.plan, [uploads, *form], plan, **quick)
        shown = [slider, crops, params, download]
        job = run.click(page.run, [session, uploads, *form], [status, outputs, which], **quick)
        job.then(page.show, [outputs, which, *view], shown, **quick)
        cancel.click(page.cancel, session, status, **quick)
        gr.on([c.change for c in (which, *view)], page.show, [outputs, which, *view], shown, **quick)
    return demo
