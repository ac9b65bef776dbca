"""The tiny X2SAM on the built-in synthetic dataset (coloured shapes over textures), on CPU.

Evaluate a trained model (a training workdir or a model directory) on every synthetic task:

    python eval.py --config configs/x2sam_tiny_synthetic.py --checkpoint runs/tiny \\
        --output runs/tiny/eval [--tasks coco_panoptic ref_ytvos] [--visualize 4]

eval.py writes the synthetic data to `data_root` first when it is missing. It reports, per dataset:
COCO panoptic PQ/SQ/RQ, mIoU and AP; RefCOCO cIoU/gIoU; COCO-VGD AP; COCO-Interactive cIoU/mIoU;
GranD-f-style GCG METEOR, CIDEr, AP50, mIoU, recall; YouTube-VIS track AP and X2SAM's per-frame mAP; Ref-YouTube-VOS and YouTube-VOS J, F, J&F (and
X2SAM's pooled J&F). An untrained tiny model scores near zero; `eval.py --oracle` feeds the ground
truth of each batch back as the prediction and scores 1.0 when the frames' longest side equals the
S/4 mask grid (32 pixels for the tiny model: `--config.synthetic.size=32`), slightly below 1.0
otherwise (the grid is coarser than the frames). One evaluation of the default data takes a few
minutes on a 2-core CPU: three compiles (image and clip forward, GCG generation), ~5 images/s and
~1 clip/s (benchmarks/bench_eval.py), and Java's start for METEOR / CIDEr.

The `eval` section is the evaluation helper's; the training sections come from the training helper.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data_root = "data/synthetic"
    # synthetic.generate arguments (eval.py / train.py write the data when data_root is missing).
    config.synthetic = ml_collections.ConfigDict(dict(num_images=40, num_videos=8, frames=8, size=(120, 160), seed=0))
    config.model = ml_collections.ConfigDict(dict(preset="tiny"))
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    config.eval = eval_config(config)
    return config


def eval_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The datasets, batching and buckets of `x2sam_jax.eval.evaluate` (see its docstring)."""
    ev = ml_collections.ConfigDict()
    ev.data_root = config.get_ref("data_root")
    ev.seed = config.get_ref("seed")
    ev.batch_size = 8                   # global rows per batch
    ev.max_samples = 0                  # 0 = every sample (training can evaluate on fewer)
    ev.fast_compile = None              # None: XLA backend optimisation off on CPU
    # One value per dimension except text length and frames: image datasets share one program
    # per text bucket, clips another.
    ev.buckets = ml_collections.ConfigDict(dict(
        seq_lengths=(512, 1024), patch_counts=(512,), grids=(1,), frames=(1, 8), instances=(16,),
        conditions=(32,), regions=(8,), seg_tokens=(8,)))
    ev.feature = ml_collections.ConfigDict(dict(clip_len=8))
    ev.datasets = ml_collections.ConfigDict({
        # image generic: PQ / mIoU / AP from one forward over the whole vocabulary
        "coco_panoptic": dict(source=dict(type="coco_panoptic", root="coco", split="val2017"),
                              options=dict(metrics=("PQ", "mIoU", "AP"))),
        # image referring: one forward per expression (split_phrases defaults to True)
        "refcoco": dict(source=dict(type="refcoco", root="refcocos", split="val")),
        # image VGD: point prompts, AP over the prompted categories
        "coco_vgd": dict(source=dict(type="coco_vgd", root="coco_vgd", split="val", prompt_kinds=("point",))),
        # image interactive: point prompts, cIoU / mIoU
        "coco_interactive": dict(source=dict(type="coco_interactive", root="coco_int", split="val",
                                             prompt_kinds=("point",))),
        # image GCG: the caption is generated, then each <p>phrase</p> segmented; METEOR / CIDEr
        # need Java (captions=False leaves them out)
        "grandf_gcg": dict(source=dict(type="GcgSource", ann_file="grand_f/annotations/val/GranDf_HA_GCG_val.json",
                                       image_dir="coco/val2017", name="grandf_gcg"), options=dict(captions=True)),
        # video generic (YouTube-VIS): track AP and X2SAM's per-frame mAP
        "ytvis19": dict(source=dict(type="ytvis19", root="ytvis19", split="valid"), options=dict(metrics=("AP",))),
        # video referring: one sample per expression, J&F
        "ref_ytvos": dict(source=dict(type="ref_ytvos", root="ytrvos21", split="valid", group="expression")),
        # video object: the first-frame mask prompt of each object, J&F
        "ytvos": dict(source=dict(type="ytvos19", root="ytrvos21", split="valid"),
                      feature=dict(eval_prompt_kind="mask")),
    })
    return ev
