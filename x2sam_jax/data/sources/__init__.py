"""Random-access dataset sources (Grain MapDataset-compatible) that turn on-disk datasets into Samples.

Every source has `__len__`, `__getitem__(i) -> Sample`, `frame_count(i)` (cheap, for length
sorting) and a `name`; a malformed record raises `schema.BadSample`, a missing dataset file or
directory raises FileNotFoundError at construction. `FACTORIES` maps a dataset name to the
function that builds its source from the dataset's root folder (the official X2SAM data tree).
"""

from x2sam_jax.data.sources import chat_bench
from x2sam_jax.data.sources.chat import LlavaChatSource, VideoInstructSource, llava, video_chatgpt
from x2sam_jax.data.sources.coco import (
    CocoInstancesSource,
    CocoPanopticSource,
    ade20k_panoptic,
    coco_instances,
    coco_panoptic,
)
from x2sam_jax.data.sources.common import (
    MalformedRecord,
    Source,
    check_rle,
    decode_rle,
    encode_mask,
    open_frame,
    to_rle,
)
from x2sam_jax.data.sources.gcg import GcgSource, grand_f
from x2sam_jax.data.sources.lisa import LisaReasonSegSource
from x2sam_jax.data.sources.refer import ReferSource, grefcoco, refcoco
from x2sam_jax.data.sources.refvos import (
    RefVosSource,
    ReVosSource,
    YouTubeVosSource,
    ref_davis17,
    reason_vos,
    ref_youtube_vos,
    revos,
    youtube_vos,
)
from x2sam_jax.data.sources.sa1b import Sa1bSource, sa1b
from x2sam_jax.data.sources.tfds_source import TfdsSource, prepare_tfds
from x2sam_jax.data.sources.vgd import (
    CocoInteractiveSource,
    CocoVgdSource,
    VideoVgdSource,
    coco_interactive,
    coco_vgd,
    prompt_frame,
    video_vgd,
)
from x2sam_jax.data.sources.video_gcg import (
    DenseCapGcgVideoSource,
    MarkupGcgVideoSource,
    ObjectPngGcgVideoSource,
    glamm_video_gcg,
    mevis_gcg,
    vidstg_gcg,
    ytvos_gcg,
)
from x2sam_jax.data.sources.video_genseg import VipSegSource, VspwSource, vipseg, vspw
from x2sam_jax.data.sources.ytvis import YouTubeVisSource, youtube_vis

# dataset name -> factory(root, split, **kwargs); other sources take explicit file paths.
FACTORIES = {
    "coco_panoptic": coco_panoptic,
    "coco_instances": coco_instances,
    "ade20k_panoptic": ade20k_panoptic,
    "refcoco": lambda root, split="train", **kw: refcoco(root, "refcoco", split, **kw),
    "refcocop": lambda root, split="train", **kw: refcoco(root, "refcoco+", split, **kw),
    "refcocog": lambda root, split="train", **kw: refcoco(root, "refcocog", split, **kw),
    "grefcoco": grefcoco,
    "lisa": lambda root, split="train", **kw: LisaReasonSegSource(root, split, **kw),
    "grandf_gcg": lambda root, subset="grandf", **kw: grand_f(root, subset, **kw),   # also val / test
    "refcocog_gcg": lambda root, **kw: grand_f(root, "refcocog", **kw),
    "psg_gcg": lambda root, **kw: grand_f(root, "psg", **kw),
    "flickr_gcg": lambda root, **kw: grand_f(root, "flickr", **kw),
    "coco_vgd": coco_vgd,
    "coco_interactive": coco_interactive,
    "llava": llava,
    "videochatgpt": video_chatgpt,
    "ytvis19_vgd": lambda root, split="train", **kw: video_vgd(root, "yt19", split, **kw),
    "vipseg_vgd": lambda root, split="train", **kw: video_vgd(root, "vipseg", split, **kw),
    "mevis_gcg": mevis_gcg,
    "ytvos_gcg": ytvos_gcg,
    "video_gcg": glamm_video_gcg,
    "vidstg_gcg": vidstg_gcg,
    "hcstvg_gcg": lambda root, split="train", **kw: vidstg_gcg(root, split, subset="hcstvg", **kw),
    "ytvis19": youtube_vis,
    "ytvis21": lambda root, split="train", **kw: youtube_vis(root, split, **{"name": "ytvis21", "task": "vov_seg", **kw}),
    "vipseg": vipseg,
    "vspw": vspw,
    "ref_ytvos": ref_youtube_vos,
    "ref_davis17": ref_davis17,
    "revos": revos,
    "reason_vos": reason_vos,
    "ytvos19": youtube_vos,
    "sa1b": sa1b,
}
FACTORIES.update(chat_bench.FACTORIES)   # chat benchmarks: mme, pope, mmbench, ..., longvideobench



def build_source(spec: dict):
    """A source from a config dict {"type": name, **kwargs}: `name` is a FACTORIES key (kwargs are
    root, split, ...) or a source class of this package (e.g. "GcgSource" with its file paths)."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind in FACTORIES:
        return FACTORIES[kind](**spec)
    cls = globals().get(kind)
    if isinstance(cls, type) and issubclass(cls, Source):
        return cls(**spec)
    raise ValueError(f"unknown source type {kind!r}; known: {sorted(FACTORIES)} or a *Source class name")


__all__ = [
    "FACTORIES", "build_source", "Source", "decode_rle", "encode_mask", "open_frame", "to_rle",
    "CocoPanopticSource", "CocoInstancesSource", "coco_panoptic", "coco_instances", "ade20k_panoptic",
    "ReferSource", "refcoco", "grefcoco", "LisaReasonSegSource", "GcgSource",
    "CocoVgdSource", "CocoInteractiveSource", "VideoVgdSource", "coco_vgd", "prompt_frame",
    "LlavaChatSource", "VideoInstructSource", "llava", "video_chatgpt", "grand_f", "coco_interactive", "video_vgd",
    "mevis_gcg", "ytvos_gcg", "glamm_video_gcg",
    "YouTubeVisSource", "youtube_vis", "VipSegSource", "VspwSource", "vipseg", "vspw",
    "RefVosSource", "ReVosSource", "YouTubeVosSource", "ref_youtube_vos", "ref_davis17", "revos", "reason_vos",
    "youtube_vos",
    "MarkupGcgVideoSource", "DenseCapGcgVideoSource", "ObjectPngGcgVideoSource", "vidstg_gcg", "TfdsSource", "prepare_tfds",
    "Sa1bSource", "sa1b", "MalformedRecord", "check_rle",
]
