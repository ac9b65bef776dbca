"""Sample -> model-input features (the dict of docs/data.md#features), for every task.

Steps: validate; cut a video to one clip; decode the frames; turn the task into conditions,
mask targets and (for region tasks) visual prompts; template the conversation; preprocess the
frames for Qwen3-VL and SAM2; tokenize; find <p>..</p> spans and <SEG> positions.

Targets: one mask track per target, `gt_classes` = index of the condition (<p>..</p> span, in
sequence order) it answers. Vocabulary tasks: one target per non-crowd instance whose category
was sampled; referring / reasoning / GCG: one target per expression (union of its instances;
an expression without instances is a no-target condition); interactive / object: one region
and one target per instance; VGD: one region per category (a random instance of it draws the
prompt) and every instance of that category is a target. Dataset-given prompts (one per kind
and frame in the sources) are reduced to one per instance first: a random kind of
`prompt_kinds` in training, `eval_prompt_kind` in evaluation (instances without it are dropped).
Frames come from files, TFDS-embedded bytes or, for video chat, a directory of extracted frames.
`gt_frame_valid[t, n]` is True where target n has pixels on frame t (frames are independent
matching problems). Chat samples (no masks) carry no SAM side at all: no `sam_pixel_values`,
`sam_valid_hw`, mask targets or visual prompts. Unusable samples raise `schema.BadSample` with
the reason.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from x2sam_jax.data import clips as clips_mod
from x2sam_jax.data import prompts as prompts_mod
from x2sam_jax.data import templates as tpl
from x2sam_jax.data import tokenizer as tok_mod
from x2sam_jax.data import transforms as tf
from x2sam_jax.data.schema import TASKS, BadSample, Sample
from x2sam_jax.data.sources.vgd import prompt_frame

TASK_IDS = {task: i for i, task in enumerate(TASKS)}
FAMILIES = {
    "gen_seg": "vocabulary", "ov_seg": "vocabulary", "vgen_seg": "vocabulary", "vov_seg": "vocabulary",
    "ref_seg": "referring", "vref_seg": "referring",
    "reason_seg": "reasoning", "vreason_seg": "reasoning",
    "gcg_seg": "gcg", "vgcg_seg": "gcg",
    "inter_seg": "instance_regions", "vinter_seg": "instance_regions", "vobj_seg": "instance_regions",
    "vgd_seg": "category_regions", "vvgd_seg": "category_regions",
    "chat": "chat", "vchat": "chat",
}  # fmt: skip
VIDEO_TASKS = frozenset(t for t in TASKS if t.startswith("v") and t != "vgd_seg")
PER_FRAME_META = ("frame_bytes", "frame_paths", "frame_category_ids")


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    qwen: tf.QwenVisionPreprocessConfig = tf.QwenVisionPreprocessConfig()
    sam: tf.SamPreprocessConfig = tf.SamPreprocessConfig()
    prompts: prompts_mod.PromptConfig = prompts_mod.PromptConfig()
    max_categories: int = 128  # vocabulary tasks in training: positives + negatives up to this
    max_phrases: int = 8  # referring / reasoning expressions kept per sample in training
    max_regions: int = 8  # interactive / object regions kept per sample in training
    region_tokens: int = 64
    clip_len: int = 8
    clip_mode: str = "stride"  # "stride" | "span"
    span_tasks: tuple[str, ...] = ("vreason_seg", "vgcg_seg")  # ReVOS and video GCG clips use span mode
    clip_stride: int = 1
    prompt_kinds: tuple[str, ...] = prompts_mod.PROMPT_KINDS  # training draws one of these per region
    eval_prompt_kind: str = "point"  # evaluation uses one fixed kind
    max_length: int = 262144 - 40 * 40 - 1024  # the official limit; longer samples are BadSample
    # Stage 1 (class-agnostic segmentor): every usable instance mask is a target of class 0, at
    # most `max_instances` (a random subset in training); no text, no Qwen3-VL inputs.
    class_agnostic: bool = False
    max_instances: int = 100


@dataclasses.dataclass
class _Plan:
    turns: list
    num_conditions: int
    targets: list  # [(instance indices, class index)]
    regions: list  # [(bool mask [H, W], frame)]
    allow_empty: bool = False  # a no-target expression makes an empty target set legitimate


_IDS_CACHE: dict[int, tok_mod.SpecialIds] = {}


def _special_ids(tokenizer) -> tok_mod.SpecialIds:
    key = id(tokenizer)
    if key not in _IDS_CACHE:
        _IDS_CACHE[key] = tok_mod.SpecialIds.from_tokenizer(tokenizer)
    return _IDS_CACHE[key]


def eval_clips(task: str, num_frames: int, config: FeatureConfig | None = None) -> list[list[int]] | None:
    """The clips (frame index lists) evaluation walks for a sample, in order; None when the
    sample is used whole (images, chat, videos no longer than clip_len)."""
    cfg = config or FeatureConfig()
    if task not in VIDEO_TASKS or FAMILIES[task] == "chat" or num_frames <= cfg.clip_len:
        return None
    mode = "span" if task in cfg.span_tasks else cfg.clip_mode
    return clips_mod.all_clips(num_frames, mode, cfg.clip_len, cfg.clip_stride)


def feature_config(config: FeatureConfig | None = None, **overrides) -> FeatureConfig:
    """A FeatureConfig with `make_features`-style overrides (sam_size=..., clip_len=...)."""
    return _config(config, dict(overrides))


def _config(config: FeatureConfig | None, overrides: dict) -> FeatureConfig:
    config = config or FeatureConfig()
    if "sam_size" in overrides:
        config = dataclasses.replace(config, sam=dataclasses.replace(config.sam, size=int(overrides.pop("sam_size"))))
    unknown = set(overrides) - {f.name for f in dataclasses.fields(FeatureConfig)}
    if unknown:
        raise TypeError(f"make_features: unknown options {sorted(unknown)}")
    return dataclasses.replace(config, **overrides) if overrides else config


def select_frames(sample: Sample, frame_indices: list[int]) -> Sample:
    """The sample restricted to some frames (masks, times and visual prompts follow)."""
    remap = {old: new for new, old in enumerate(frame_indices)}
    instances = [dataclasses.replace(i, masks=[i.masks[f] for f in frame_indices]) for i in sample.instances]
    prompts = [dataclasses.replace(p, frame=remap[p.frame]) for p in sample.visual_prompts if p.frame in remap]
    times = None if sample.frame_times is None else [sample.frame_times[f] for f in frame_indices]
    meta = dict(sample.meta)
    for key in PER_FRAME_META:  # per-frame lists (TFDS frame bytes...) follow the frames
        if isinstance(meta.get(key), list) and len(meta[key]) == sample.num_frames:
            meta[key] = [meta[key][f] for f in frame_indices]
    return dataclasses.replace(
        sample,
        frames=[sample.frames[f] for f in frame_indices],
        instances=instances,
        visual_prompts=prompts,
        frame_times=times,
        meta=meta,
    )


def load_frames(sample: Sample, default_video_frames: int = 8) -> tuple[list[np.ndarray], Sample]:
    """The decoded RGB uint8 frames of a sample, and the sample with its size filled in.

    Frames come from image files, from TFDS-embedded bytes (meta["frame_bytes"], frames named
    tfds://...), or, for VideoInstruct chat (meta["video_file"]), from `meta["num_frames"]` frames
    sampled uniformly from the video file (PyAV) or a directory of its extracted frames, within
    meta["bound"] (start, end) seconds when given (MVBench: the cut clip, whose times start at 0);
    the frame times come from meta["fps"] or the file's own rate (an undecodable video is a BadSample)."""
    where = f"{sample.dataset}[{sample.sample_id}]"
    if sample.meta.get("video_file"):
        count = int(sample.meta.get("num_frames", default_video_frames))
        video = tf.load_video_frames(sample.frames[0], count, bound=sample.meta.get("bound"),
                                     fps=sample.meta.get("fps"))
        sizes = {f.shape[:2] for f in video.frames}
        if len(sizes) != 1:
            raise BadSample(f"{where}: frames of {sample.frames[0]} differ in size: {sorted(sizes)}")
        (height, width), fps = sizes.pop(), video.fps
        positions = video.indices if video.clip_indices is None else video.clip_indices
        times = [float(i) / float(fps) for i in positions] if fps else None
        return video.frames, dataclasses.replace(sample, height=height, width=width, frame_times=times)
    embedded = sample.meta.get("frame_bytes")
    if embedded:
        if len(embedded) != sample.num_frames:
            raise BadSample(f"{where}: {len(embedded)} embedded frames for {sample.num_frames} frame names")
        frames = [tf.load_image_bytes(data, name) for data, name in zip(embedded, sample.frames)]
    else:
        frames = [tf.load_image(path) for path in sample.frames]
    for name, image in zip(sample.frames, frames):
        if image.shape[:2] != (sample.height, sample.width):
            raise BadSample(
                f"{where}: {name} is {image.shape[0]}x{image.shape[1]}, annotation says {sample.height}x{sample.width}"
            )
    return frames, sample


# ------------------------------------------------------------------------------------- masks
class _Masks:
    """Decodes instance masks lazily, once per (instance, frame)."""

    def __init__(self, sample: Sample):
        self.sample, self._cache = sample, {}

    def get(self, instance: int, frame: int) -> np.ndarray:
        key = (instance, frame)
        if key not in self._cache:
            rle = self.sample.instances[instance].masks[frame]
            where = f"{self.sample.dataset}[{self.sample.sample_id}] instance {instance} frame {frame}"
            try:
                self._cache[key] = tf.decode_rle(rle, self.sample.height, self.sample.width)
            except BadSample as err:
                raise BadSample(f"{where}: {err}", kind=getattr(err, "kind", None)) from err
            except Exception as err:  # a malformed RLE from the source
                raise BadSample(f"{where}: bad RLE ({err})") from err
        return self._cache[key]

    def union(self, instances, frame: int) -> np.ndarray:
        out = np.zeros((self.sample.height, self.sample.width), bool)
        for i in instances:
            out |= self.get(i, frame)
        return out

    def has_pixels(self, instance: int) -> bool:
        return any(
            m is not None and self.get(instance, t).any() for t, m in enumerate(self.sample.instances[instance].masks)
        )

    def first_frame_with_pixels(self, instance: int) -> int | None:
        for t in range(self.sample.num_frames):
            if self.sample.instances[instance].masks[t] is not None and self.get(instance, t).any():
                return t
        return None


def _given_prompt_mask(prompt, height: int, width: int, cfg: prompts_mod.PromptConfig) -> np.ndarray:
    """A dataset-given prompt (mask RLE, box or points) as a bool mask at image resolution."""
    if prompt.mask is not None:
        return tf.decode_rle(prompt.mask, height, width)
    out = np.zeros((height, width), bool)
    if prompt.box is not None:
        x0, y0, x1, y1 = prompt.box
        out[max(0, int(y0)) : min(height, int(np.ceil(y1))), max(0, int(x0)) : min(width, int(np.ceil(x1)))] = True
        return out
    if prompt.points:
        for x, y in prompt.points:
            if 0 <= int(y) < height and 0 <= int(x) < width:
                out[int(y), int(x)] = True
        radius = cfg.point_radius if prompt.kind == "point" else cfg.scribble_radius
        return prompts_mod.dilate_disk(out, radius)
    raise BadSample(f"visual prompt of kind {prompt.kind!r} on frame {prompt.frame} has no mask, box or points")


def _subset(items: list, limit: int, rng, train: bool) -> list[int]:
    """Indices of at most `limit` items (random, order kept) in training; all in evaluation."""
    if not train or len(items) <= limit:
        return list(range(len(items)))
    return sorted(rng.choice(len(items), size=limit, replace=False).tolist())


# ------------------------------------------------------------------------------------- planning
def _plan(sample: Sample, masks: _Masks, family: str, video: bool, train: bool, rng, cfg: FeatureConfig) -> _Plan:
    usable = [
        i for i, inst in enumerate(sample.instances) if not inst.iscrowd and masks.has_pixels(i)
    ]  # crowd regions are never targets
    if family == "chat":
        return _Plan(tpl.chat_turns(sample.conversation, video), 0, [], [])

    if family == "vocabulary":
        named = [i for i in usable if sample.instances[i].category is not None]
        positives = list(dict.fromkeys(sample.instances[i].category for i in named))
        vocabulary = sample.categories or positives
        categories = tpl.sample_categories(vocabulary, positives, rng, train, cfg.max_categories)
        index = {c: k for k, c in enumerate(categories)}
        targets = [([i], index[sample.instances[i].category]) for i in named if sample.instances[i].category in index]
        return _Plan(tpl.vocabulary_turns(categories, rng, video), len(categories), targets, [])

    if family in ("referring", "reasoning", "gcg"):
        phrases = sample.phrases
        if family == "gcg":
            if sample.caption is None:
                raise BadSample(f"{sample.dataset}[{sample.sample_id}]: GCG sample without a caption")
            if any(p.span is None for p in phrases):
                raise BadSample(f"{sample.dataset}[{sample.sample_id}]: GCG phrase without a caption span")
            phrases = sorted(phrases, key=lambda p: p.span[0])
        else:
            phrases = [phrases[k] for k in _subset(phrases, cfg.max_phrases, rng, train)]
        if not phrases:
            raise BadSample(f"{sample.dataset}[{sample.sample_id}]: no expressions for task {sample.task}")
        targets = []
        for k, phrase in enumerate(phrases):
            kept = [i for i in phrase.instance_indices if i in set(usable)]
            if kept:
                targets.append((kept, k))
        allow_empty = any(not p.instance_indices for p in phrases)
        if family == "referring":
            turns = tpl.referring_turns([p.text for p in phrases], rng, video)
        elif family == "reasoning":
            # Reasoning sources may carry the k-th expression's explanation as the k-th gpt message.
            explanations = [m["value"] for m in sample.conversation if m.get("from") == "gpt"]
            explanations = [explanations[k] if k < len(explanations) else None for k in range(len(phrases))]
            turns = tpl.reasoning_turns([p.text for p in phrases], rng, video, explanations)
        else:
            try:
                turns = tpl.gcg_turns(sample.caption, [tuple(p.span) for p in phrases], rng, video)
            except ValueError as err:
                raise BadSample(f"{sample.dataset}[{sample.sample_id}]: {err}") from err
        return _Plan(turns, len(phrases), targets, [], allow_empty)

    # Region tasks: given prompts win; otherwise prompts are synthesised from the masks.
    if sample.visual_prompts:
        return _plan_given_prompts(sample, usable, family, video, train, rng, cfg)

    if family == "instance_regions":
        groups = [[i] for i in usable]
        groups = [groups[k] for k in _subset(groups, cfg.max_regions, rng, train)]
    else:  # category_regions: one prompt per category, all its instances are targets
        by_category: dict = {}
        for i in usable:
            by_category.setdefault(sample.instances[i].category, []).append(i)
        groups = list(by_category.values())
        if train:
            groups = [groups[k] for k in rng.permutation(len(groups))]
    regions, targets = [], []
    for members in groups:
        source = members[int(rng.integers(len(members)))] if train else members[0]
        frame = masks.first_frame_with_pixels(source)
        mask = masks.get(source, frame)
        if train:
            drawn = prompts_mod.random_prompt(mask, rng, cfg.prompt_kinds, cfg.prompts)
            prompt = None if drawn is None else drawn[1]
        else:
            prompt = prompts_mod.synthesize(mask, cfg.eval_prompt_kind, rng, cfg.prompts)
            prompt = prompt if prompt.any() else None
        if prompt is None:  # an instance too small for any prompt shape
            continue
        targets.extend(([i], len(regions)) for i in members)
        regions.append((prompt, frame))
    if not regions:
        raise BadSample(f"{sample.dataset}[{sample.sample_id}]: no instance large enough for a visual prompt")
    return _Plan(tpl.region_turns(len(regions), rng, video), len(regions), targets, regions)


def _choose_given_prompts(sample: Sample, train: bool, rng, cfg: FeatureConfig) -> list:
    """One dataset-given prompt per instance group (as the official datasets): sources list every
    available kind (and, for videos, every frame); training draws one of the kinds in
    `cfg.prompt_kinds` at random, evaluation takes `cfg.eval_prompt_kind` and drops groups without
    it. Video prompts sit on one frame: the official prompt frame when its category ids are known
    (sources.vgd.prompt_frame), else the group's first prompted frame."""
    preferred = None
    if sample.meta.get("frame_category_ids") and len(sample.meta["frame_category_ids"]) == sample.num_frames:
        preferred = prompt_frame(sample.meta["frame_category_ids"])
    groups: dict = {}
    for prompt in sample.visual_prompts:
        groups.setdefault(tuple(prompt.instance_indices), []).append(prompt)
    kinds = cfg.prompt_kinds if train else (cfg.eval_prompt_kind,)
    chosen = []
    for group in groups.values():
        candidates = [p for p in group if p.kind in kinds]
        if not candidates:  # e.g. no prompt of the evaluated kind: the official drops the annotation
            continue
        frames = sorted({p.frame for p in candidates})
        frame = preferred if preferred in frames else frames[0]
        on_frame = [p for p in candidates if p.frame == frame]
        chosen.append(on_frame[int(rng.integers(len(on_frame)))] if train else on_frame[0])
    return chosen


def _plan_given_prompts(sample: Sample, usable: list, family: str, video: bool, train: bool, rng,
                        cfg: FeatureConfig) -> _Plan:
    """Interactive / object: one region per prompted instance (at most `max_regions` in training).
    VGD: one region per category, drawn from one of its prompted instances (random in training,
    the first in evaluation; the official model samples one prompt per category), and every
    prompted instance of the category is a target."""
    where = f"{sample.dataset}[{sample.sample_id}]"
    prompts = _choose_given_prompts(sample, train, rng, cfg)
    usable_set = set(usable)
    if family == "category_regions":
        by_category: dict = {}
        for prompt in prompts:
            categories = {sample.instances[i].category_id if sample.instances[i].category is None
                          else sample.instances[i].category for i in prompt.instance_indices}
            if len(categories) != 1:
                raise BadSample(f"{where}: a VGD prompt covers instances of {len(categories)} categories")
            by_category.setdefault(categories.pop(), []).append(prompt)
        keys = list(by_category)
        if train:
            keys = [keys[k] for k in rng.permutation(len(keys))]
        regions, targets = [], []
        for key in keys:
            options = by_category[key]
            prompt = options[int(rng.integers(len(options)))] if train else options[0]
            # Targets: the category's instances that kept a prompt (the official dataset drops
            # annotations without one, in evaluation those without the evaluated kind).
            members = sorted({i for p in options for i in p.instance_indices} & usable_set)
            targets.extend(([i], len(regions)) for i in members)
            regions.append((_given_prompt_mask(prompt, sample.height, sample.width, cfg.prompts), prompt.frame))
    else:
        prompts = [prompts[k] for k in _subset(prompts, cfg.max_regions, rng, train)]
        regions, targets = [], []
        for k, prompt in enumerate(prompts):
            regions.append((_given_prompt_mask(prompt, sample.height, sample.width, cfg.prompts), prompt.frame))
            kept = [i for i in prompt.instance_indices if i in usable_set]
            if kept:
                targets.append((kept, k))
    if not regions:
        kinds = cfg.prompt_kinds if train else (cfg.eval_prompt_kind,)
        raise BadSample(f"{where}: no given visual prompt of kind {'/'.join(kinds)}")
    return _Plan(tpl.region_turns(len(regions), rng, video), len(regions), targets, regions)


def _video_layout(sample: Sample, grid_thw: np.ndarray, merge_size: int) -> tok_mod.VideoLayout:
    """Timestamps per temporal group: the mean time of its first and last frame when known,
    otherwise 1, 2, 3, ... (the official fallback)."""
    groups = int(grid_thw[0])
    tokens = int(grid_thw[1] * grid_thw[2]) // (merge_size * merge_size)
    if sample.frame_times is None:
        return tok_mod.VideoLayout(tuple(float(g + 1) for g in range(groups)), tokens)
    times = list(sample.frame_times)
    times += [times[-1]] * (2 * groups - len(times))
    return tok_mod.VideoLayout(tuple((times[2 * g] + times[2 * g + 1]) / 2 for g in range(groups)), tokens)


def _sam_inputs(frames: list[np.ndarray], cfg: FeatureConfig) -> tuple[np.ndarray, np.ndarray]:
    """SAM frames [T, S, S, 3] uint8 (written straight into the stacked array) and their valid sizes."""
    sam_pixels = np.empty((len(frames), cfg.sam.size, cfg.sam.size, 3), np.uint8)
    sam_valid = np.stack([tf.sam_image(f, cfg.sam, out=sam_pixels[t])[1] for t, f in enumerate(frames)])
    return sam_pixels, sam_valid.astype(np.int32)


def _target_grids(masks: _Masks, targets: list, t_count: int, cfg: FeatureConfig) -> np.ndarray:
    """[T, N, S/4, S/4] bool: the union of each target's instances on the padded S/4 grid."""
    grid_size = cfg.sam.size // cfg.sam.mask_stride
    gt_masks = np.zeros((t_count, len(targets), grid_size, grid_size), bool)
    for n, instances in enumerate(targets):
        for t in range(t_count):
            gt_masks[t, n] = tf.gt_mask_grid(masks.union(instances, t), cfg.sam)
    return gt_masks


def _class_agnostic_features(sample: Sample, frames, masks: _Masks, train: bool, rng, cfg: FeatureConfig) -> dict:
    """Stage-1 form: every usable (non-crowd, nonempty) instance is a target of class 0, at
    most `max_instances` (a random subset in training, the first ones in evaluation); no text
    (empty input_ids / labels) and no Qwen3-VL pixels."""
    where = f"{sample.dataset}[{sample.sample_id}]"
    usable = [i for i, inst in enumerate(sample.instances) if not inst.iscrowd and masks.has_pixels(i)]
    usable = [usable[k] for k in _subset(usable, cfg.max_instances, rng, train)][: cfg.max_instances]
    if not usable:
        raise BadSample(f"{where}: no usable instance mask for the class-agnostic form")
    sam_pixels, sam_valid = _sam_inputs(frames, cfg)
    gt_masks = _target_grids(masks, [[i] for i in usable], len(frames), cfg)
    gt_frame_valid = gt_masks.any(axis=(2, 3))
    keep = gt_frame_valid.any(axis=0)          # masks that vanish at S/4 on every frame are dropped
    if not keep.any():
        grid_size = cfg.sam.size // cfg.sam.mask_stride
        raise BadSample(f"{where}: every target mask vanishes at {grid_size}x{grid_size}")
    empty = np.zeros((0,), np.int32)
    return {
        "input_ids": empty, "labels": empty,
        "sam_pixel_values": sam_pixels,
        "sam_valid_hw": sam_valid,
        "orig_hw": np.array([sample.height, sample.width], np.int32),
        "gt_masks": gt_masks[:, keep],
        "gt_classes": np.zeros(int(keep.sum()), np.int32),
        "gt_frame_valid": gt_frame_valid[:, keep],
        "task_id": np.int32(TASK_IDS[sample.task]),
        "num_frames": np.int32(len(frames)),
    }


def _segmentation_features(sample: Sample, frames, masks: _Masks, plan: _Plan, cfg: FeatureConfig) -> dict:
    """The SAM side of a sample: its frames, its targets on the padded S/4 grid, its visual prompts."""
    where = f"{sample.dataset}[{sample.sample_id}]"
    sam_pixels, sam_valid = _sam_inputs(frames, cfg)
    grid_size = cfg.sam.size // cfg.sam.mask_stride
    gt_masks = _target_grids(masks, [instances for instances, _ in plan.targets], len(frames), cfg)
    gt_frame_valid = gt_masks.any(axis=(2, 3))
    if plan.targets and not gt_frame_valid.any():
        raise BadSample(f"{where}: every target mask vanishes at {grid_size}x{grid_size}")
    regions = np.zeros((len(plan.regions), cfg.sam.size, cfg.sam.size), bool)
    for r, (mask, _) in enumerate(plan.regions):
        regions[r] = tf.region_mask_grid(mask, cfg.sam)
    return {
        "sam_pixel_values": sam_pixels,
        "sam_valid_hw": sam_valid,
        "gt_masks": gt_masks,
        "gt_classes": np.array([c for _, c in plan.targets], np.int32),
        "gt_frame_valid": gt_frame_valid,
        "region_masks": regions,
        "region_frame": np.array([f for _, f in plan.regions], np.int32),
    }


# ------------------------------------------------------------------------------------- entry point
def make_features(
    sample: Sample,
    *,
    tokenizer,
    train: bool,
    rng: np.random.Generator,
    config: FeatureConfig | None = None,
    clip: list[int] | None = None,
    **overrides,
) -> dict:
    """One unpadded training / evaluation example. `clip` picks video frames (default: a random
    clip in training, the first clip in evaluation, when the video is longer than clip_len)."""
    cfg = _config(config, dict(overrides))
    sample.validate()
    where = f"{sample.dataset}[{sample.sample_id}]"
    if train and not sample.has_targets:
        raise BadSample(f"{where}: no ground truth (a sample of an evaluation-only split) cannot train",
                        kind="malformed_record")
    family = FAMILIES[sample.task]
    video = sample.task in VIDEO_TASKS
    if clip is None:
        clips = eval_clips(sample.task, sample.num_frames, cfg)
        if clips is not None:  # training draws one clip; evaluation here takes the first (the eval
            # pipeline walks all of them, see pipeline.build_eval_pipeline)
            clip = clips[int(rng.integers(len(clips)))] if train else clips[0]
    if clip is not None:
        sample = select_frames(sample, list(clip))

    frames, sample = load_frames(sample, cfg.clip_len)
    if not video and len(frames) != 1:
        raise BadSample(f"{where}: image task {sample.task} with {len(frames)} frames")

    masks = _Masks(sample)
    if cfg.class_agnostic:
        return _class_agnostic_features(sample, frames, masks, train, rng, cfg)
    try:
        plan = _plan(sample, masks, family, video, train, rng, cfg)
    except ValueError as err:  # malformed conversation / spans from the source
        raise BadSample(f"{where}: {err}") from err
    # A sample without ground truth (withheld by the benchmark) is evaluated for its predictions only.
    if family != "chat" and not plan.targets and not plan.allow_empty and sample.has_targets:
        raise BadSample(f"{where}: every target mask is empty or crowd (task {sample.task})")

    # Vision inputs.
    if video:
        pixel_values, grid = tf.qwen_video_patches(frames, cfg.qwen)
        image_tokens, videos = [], [_video_layout(sample, grid, cfg.qwen.merge_size)]
    else:
        pixel_values, grid = tf.qwen_image_patches(frames[0], cfg.qwen)
        image_tokens, videos = [tf.merged_token_count(grid, cfg.qwen.merge_size)], []
    # SAM frames, targets on the padded S/4 grid and visual prompts: none for chat, whose batches
    # carry no frames and train the LLM alone (data.batching.Collator, train.step.Task.language_only).
    segmentation = {}
    if family != "chat":
        segmentation = _segmentation_features(sample, frames, masks, plan, cfg)

    # Text.
    ids = _special_ids(tokenizer)
    try:
        input_ids, labels = tok_mod.encode_turns(
            plan.turns, tokenizer, ids, image_tokens=image_tokens, videos=videos, region_tokens=cfg.region_tokens
        )
        spans = tok_mod.condition_spans(input_ids, ids)
    except ValueError as err:
        raise BadSample(f"{where}: {err}") from err
    if len(input_ids) > cfg.max_length:
        raise BadSample(f"{where}: {len(input_ids)} tokens exceed max_length {cfg.max_length}")
    if len(spans) != plan.num_conditions:
        raise BadSample(f"{where}: text holds {len(spans)} <p>..</p> spans for {plan.num_conditions} conditions")

    return {
        "input_ids": input_ids,
        "labels": labels,
        "pixel_values": pixel_values,
        "grid_thw": grid[None].astype(np.int32),
        "orig_hw": np.array([sample.height, sample.width], np.int32),
        **segmentation,
        "cond_spans": spans,
        "seg_positions": tok_mod.seg_positions(input_ids, ids),
        "task_id": np.int32(TASK_IDS[sample.task]),
        "num_frames": np.int32(len(frames)),
        # Per condition, the sample instances its targets are (evaluation maps conditions back to
        # dataset annotations with it; the collator leaves it out of the batch arrays).
        "condition_instances": tuple(
            tuple(sorted({i for instances, c in plan.targets if c == k for i in instances}))
            for k in range(plan.num_conditions)),
    }
