"""A web demo of a trained X2SAM: upload an image or a video, name an object or click on it, see its mask.

    python -m x2sam_jax.serve --checkpoint DIR [--host 127.0.0.1] [--port 7860] [--share off]
        [--max-batch-size 4] [--frames 8]

DIR is a training workdir or a model directory (as ``python -m x2sam_jax.predict`` takes). The
page (gradio) takes an image or a video, and a text prompt (a referring expression) or a visual
prompt on the first frame: a click on the image sets a point; with "box" chosen, two clicks set a
box's corners (both can be typed, in pixels). It shows the overlay (the input with the prompt
drawn | the masks with their scores), the model's answer and each mask's label, score and area.

One ``x2sam_jax.Predictor`` serves every request: it is restored and compiled once, and the
requests waiting in gradio's queue run together (``predict_batch``, up to ``--max-batch-size``).
A bad input (no media, a malformed point, a prompt and a click together, ...) is checked before
it queues and shows a one-line error in the page.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid

# A local demo of a local model: no usage reports to gradio's servers unless asked for.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

try:
    import gradio as gr  # noqa: E402
except ImportError as error:   # an optional dependency: say how to get it instead of a traceback
    raise SystemExit(f"error: the web demo needs gradio ({error}): pip install -e '.[demo]'") from None

from x2sam_jax.cli import cli_errors  # noqa: E402
from x2sam_jax.predictor import (TOY_MODEL_NOTE, Predictor, build_sample, compilation_cache_dir,  # noqa: E402
                                 enable_compilation_cache, is_toy_model, resolve_media)

TITLE = "X2SAM: segment what a prompt names"


def _numbers(text: str | None, count: int, what: str):
    """The numbers of a "x,y" / "x0,y0,x1,y1" field, None when it is empty."""
    if not text or not text.strip():
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count:
        hint = " (click its second corner)" if what == "box" and len(values) == 2 else ""
        raise gr.Error(f"the {what} needs {count} comma-separated numbers, got {text.strip()!r}{hint}")
    return values


def _request(image, video, prompt, point, box) -> dict:
    """The Predictor's arguments for one request of the page; a gr.Error for what is malformed."""
    if (image is None) == (video is None):
        raise gr.Error("upload an image or a video (one of them)" if image is None else
                       "give an image or a video, not both (clear one)")
    prompt = prompt.strip() if prompt and prompt.strip() else None
    return dict(media=image if image is not None else video, prompt=prompt, point=_numbers(point, 2, "point"),
                box=_numbers(box, 4, "box"))


def _click(mode: str, box: str, event: gr.SelectData):
    """A click on the input image: (point, box) fields. In "box" mode the first click starts a box
    (one corner), the second completes it (corners in either order)."""
    x, y = (int(v) for v in event.index)
    if mode != "box":
        return f"{x},{y}", ""
    corner = [v.strip() for v in (box or "").split(",")]
    if len(corner) != 2:
        return "", f"{x},{y}"
    x0, y0 = (int(float(v)) for v in corner)
    return "", f"{min(x0, x)},{min(y0, y)},{max(x0, x)},{max(y0, y)}"


class Handlers:
    """What the page's events call, over one Predictor (tests call them directly)."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        self.outputs = tempfile.mkdtemp(prefix="x2sam-serve-")     # overlays live as long as the process
        self.note = f"\n\n(note: {TOY_MODEL_NOTE})" if is_toy_model(predictor.model.config) else ""

    def check(self, image, video, prompt, point, box) -> None:
        """Every input problem as a gr.Error, before the request queues for the model (reads the
        media; no tokenizer, no device work)."""
        request = _request(image, video, prompt, point, box)
        with tempfile.TemporaryDirectory(prefix="x2sam-serve-check-") as tmp:
            try:
                frames, _, _ = resolve_media(request.pop("media"), num_frames=self.predictor.num_frames, workdir=tmp)
                build_sample(frames, **request)
            except (ValueError, FileNotFoundError) as error:
                raise gr.Error(str(error)) from None

    def segment_batch(self, images, videos, prompts, points, boxes):
        """Lists of the page's fields (gradio's batching) -> lists of (overlay file, answer,
        [mask, label, score, area %] rows), one predict_batch call for all."""
        requests = [dict(_request(*fields), out=os.path.join(self.outputs, uuid.uuid4().hex))
                    for fields in zip(images, videos, prompts, points, boxes)]
        try:
            results = self.predictor.predict_batch(requests)
        except (ValueError, FileNotFoundError) as error:
            raise gr.Error(str(error)) from None
        tables = [[[k, label, round(score, 3), round(100 * float(result.masks[:, k].mean()), 1)]
                   for k, (label, score) in enumerate(zip(result.labels, result.scores))] for result in results]
        return [r.overlay for r in results], [(r.answer or "(no answer)") + self.note for r in results], tables

    def segment(self, image, video, prompt, point=None, box=None):
        """One request: (overlay file, answer, score rows)."""
        overlays, answers, tables = self.segment_batch([image], [video], [prompt], [point], [box])
        return overlays[0], answers[0], tables[0]


def build_demo(predictor: Predictor, *, max_batch_size: int = 4) -> gr.Blocks:
    """The page over ``predictor``: a click on "Segment" checks the inputs, then queues; waiting
    requests run together, one batch at a time."""
    handlers = Handlers(predictor)
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"## {TITLE}\nUpload an image or a video, then type what to segment or click on the image "
                    "(a point, or two clicks for a box). A text prompt and a visual prompt do not mix.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", label="Image (click: point or box corner)", elem_id="image")
                video = gr.Video(label="Video (the prompt applies to its frames; a point or box to the first)",
                                 elem_id="video")
                prompt = gr.Textbox(label="Text prompt", placeholder="the red circle", elem_id="prompt")
                mode = gr.Radio(["point", "box"], value="point", label="A click on the image sets")
                with gr.Row():
                    point = gr.Textbox(label="Point x,y", elem_id="point")
                    box = gr.Textbox(label="Box x0,y0,x1,y1", elem_id="box")
                run = gr.Button("Segment", variant="primary", elem_id="run")
            with gr.Column():
                overlay = gr.Image(type="filepath", label="Input | prediction", elem_id="overlay")
                answer = gr.Textbox(label="Answer", elem_id="answer")
                scores = gr.Dataframe(headers=["mask", "label", "score", "area %"], label="Masks", elem_id="scores")
        image.select(_click, [mode, box], [point, box])
        image.upload(lambda: ("", ""), None, [point, box])       # a new image: the old clicks mean nothing
        fields = [image, video, prompt, point, box]
        run.click(handlers.check, fields, None).success(
            handlers.segment_batch, fields, [overlay, answer, scores], batch=True, max_batch_size=max_batch_size,
            concurrency_limit=1)
    return demo


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m x2sam_jax.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="training workdir or model directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", choices=("on", "off"), default="off",
                        help="on: also a public gradio.live link (default: %(default)s)")
    parser.add_argument("--max-batch-size", type=int, default=4, help="requests that run together at most")
    parser.add_argument("--frames", type=int, default=8, help="frames sampled from a video (default: %(default)s)")
    parser.add_argument("--no-cache", action="store_true", help="no persistent compilation cache")
    return parser.parse_args(argv)


@cli_errors
def main(argv=None) -> int:
    """Checks the arguments, restores and serves until interrupted; a bad argument: one line, exit 1."""
    args = parse_args(argv)
    if not os.path.isdir(args.checkpoint):
        raise FileNotFoundError(f"--checkpoint {args.checkpoint} is not a directory")
    if args.max_batch_size < 1:
        raise ValueError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if not args.no_cache:
        enable_compilation_cache(compilation_cache_dir(args.checkpoint))
    predictor = Predictor(args.checkpoint, num_frames=args.frames)
    demo = build_demo(predictor, max_batch_size=args.max_batch_size)
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share == "on")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
