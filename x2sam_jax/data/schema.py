"""The record every data source returns (`Sample`), and the source-level error type (`BadSample`).

Sources are lazy: they index annotation files at construction and build one `Sample` per
`__getitem__`. Images are never decoded here; masks stay COCO RLE dicts (decoding is the
transforms' job), so a `Sample` is cheap to build and to pickle between Grain workers.
"""

from __future__ import annotations

import dataclasses

TASKS = (
    "gen_seg", "ov_seg", "ref_seg", "reason_seg", "gcg_seg", "inter_seg", "vgd_seg", "chat",
    "vgen_seg", "vov_seg", "vref_seg", "vreason_seg", "vobj_seg", "vgcg_seg", "vinter_seg", "vvgd_seg",
    "vchat",
)

VISUAL_PROMPT_KINDS = ("point", "scribble", "box", "mask")


class BadSample(Exception):
    """A malformed record: the robust wrapper (data/robust.py) skips the sample and counts it under
    `kind` (a short reason such as "corrupt_mask"; derived from the message when not given)."""

    def __init__(self, reason: str, kind: str | None = None):
        super().__init__(reason)
        self.reason = reason
        if kind is not None:
            self.kind = kind


@dataclasses.dataclass
class Instance:
    """One object, stuff segment or video track."""

    # Per frame: COCO RLE dict {"size": [h, w], "counts": bytes|str}, or None where absent.
    masks: list
    category: str | None = None
    category_id: int | None = None
    is_thing: bool = True
    iscrowd: bool = False
    instance_id: int = -1  # segment / track / object id in the source


@dataclasses.dataclass
class Phrase:
    """A referring expression, reasoning query or GCG phrase."""

    text: str
    instance_indices: list[int]  # indices into Sample.instances; empty = no target (gRefCOCO)
    span: tuple[int, int] | None = None  # character span [start, end) in Sample.caption (GCG)


@dataclasses.dataclass
class VisualPrompt:
    """A region prompt given by the dataset (VGD / interactive datasets)."""

    kind: str  # one of VISUAL_PROMPT_KINDS
    frame: int  # frame the prompt is drawn on
    mask: dict | None  # RLE of the prompt shape at image resolution, if the dataset gives one
    box: tuple[float, float, float, float] | None = None  # xyxy, if given
    points: list | None = None  # [(x, y), ...], if given
    instance_indices: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Sample:
    dataset: str  # source name, e.g. "coco_panoptic"
    task: str  # one of TASKS
    sample_id: str
    frames: list[str]  # image file paths (one for images), in time order; a video file for VideoInstruct
    height: int  # 0 = unknown (only mask-free samples, e.g. VideoInstruct: the video file gives it)
    width: int
    instances: list[Instance] = dataclasses.field(default_factory=list)
    categories: list[str] = dataclasses.field(default_factory=list)  # dataset vocabulary
    phrases: list[Phrase] = dataclasses.field(default_factory=list)
    caption: str | None = None  # GCG caption
    conversation: list[dict] = dataclasses.field(default_factory=list)  # [{"from", "value"}]
    visual_prompts: list[VisualPrompt] = dataclasses.field(default_factory=list)
    frame_times: list[float] | None = None  # seconds, for video prompts "<t.t seconds>"
    meta: dict = dataclasses.field(default_factory=dict)
    # False for a sample of an evaluation split whose ground truth is withheld (Ref-YouTube-VOS
    # valid/test, YouTube-VIS valid/test, COCO test-dev): it carries the prompts (phrases,
    # vocabulary, visual prompts) but no target masks; evaluation turns its predictions into the
    # benchmark server's submission files (eval/submissions.py), training refuses it.
    has_targets: bool = True

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    def validate(self) -> "Sample":
        """Raise BadSample when the record is inconsistent (indices out of range, wrong task...)."""
        where = f"{self.dataset}[{self.sample_id}]"
        if self.task not in TASKS:
            raise BadSample(f"{where}: unknown task {self.task!r}")
        if not self.frames and self.task not in ("chat", "vchat"):  # pure-text chat has no image
            raise BadSample(f"{where}: no frames")
        has_masks = bool(self.instances or self.visual_prompts)
        if self.height < 0 or self.width < 0 or (has_masks and (self.height == 0 or self.width == 0)):
            raise BadSample(f"{where}: bad image size {self.height}x{self.width}")
        n_frames, n_inst = len(self.frames), len(self.instances)
        for k, inst in enumerate(self.instances):
            if len(inst.masks) != n_frames:
                raise BadSample(f"{where}: instance {k} has {len(inst.masks)} masks for {n_frames} frames")
        for phrase in self.phrases:
            if any(not 0 <= j < n_inst for j in phrase.instance_indices):
                raise BadSample(f"{where}: phrase {phrase.text!r} points at missing instances {phrase.instance_indices}")
        for prompt in self.visual_prompts:
            if prompt.kind not in VISUAL_PROMPT_KINDS:
                raise BadSample(f"{where}: unknown visual prompt kind {prompt.kind!r}")
            if not 0 <= prompt.frame < n_frames:
                raise BadSample(f"{where}: visual prompt on frame {prompt.frame} of {n_frames}")
            if any(not 0 <= j < n_inst for j in prompt.instance_indices):
                raise BadSample(f"{where}: visual prompt points at missing instances {prompt.instance_indices}")
        return self
