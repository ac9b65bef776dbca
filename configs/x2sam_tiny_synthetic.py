"""The tiny X2SAM on the built-in synthetic dataset (coloured shapes over textures), on CPU: the
README's main job (``bash scripts/main.sh`` runs exactly these two commands into runs/main).

    python train.py --config configs/x2sam_tiny_synthetic.py --workdir runs/tiny
    python eval.py --config configs/x2sam_tiny_synthetic.py --checkpoint runs/tiny \\
        --output runs/tiny/eval [--tasks coco_panoptic,refcoco,coco_vgd,ref_ytvos,ytvos] [--visualize 4]

The ``tiny`` preset (1.25 M trainable parameters, the tiny BPE tokenizer) trained from scratch
for 1100 steps with the stage-3 recipe on five synthetic sources (``x2sam_jax.data.synthetic``,
written to ``data_root`` by whichever command runs first): panoptic, referring and VGD images,
referring and object video clips. Re-running the training command resumes from the latest
complete checkpoint; after the last step it returns at once.

What it reaches (2026-12-07, seed 0, the whole held-out split, in percent; prompts drawn per
sample id): image generic PQ 86.6 / mIoU 89.9, image referring cIoU 78.9 / gIoU 82.2, image VGD AP
74.9, video referring J&F 79.1, video object J&F 77.7; the command took 18.1 min on a quiet 2-core CPU (2026-12-01). The setup,
the run history, what the mixture repeats and the pairwise class loss below are for, and what
was tried and not kept: docs/results.md.

Every field below can be overridden on the command line, e.g. ``--config.steps=1000
--config.checkpoint_every=100 --config.log_every=1 --config.data.global_batch_images=2``.
"""

import dataclasses

import ml_collections

from x2sam_jax.train.losses import LossConfig


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.stage = 3                       # 1: class-agnostic segmentor (no LLM); 3: unified training
    config.seed = 0
    config.data_root = "data/synthetic"    # the synthetic dataset (train and eval splits)
    config.steps = 1100                    # optimizer steps (0: num_epochs of the mixture plan)
    config.num_epochs = 1
    config.log_every = 25
    config.checkpoint_every = 50
    config.keep_checkpoints = 2
    config.async_checkpoints = True
    config.eval_every = 400                # 0 = never; else x2sam_jax.eval.evaluate every N steps
    config.eval_max_samples = 16           # per dataset, in the training loop's evaluations
    config.eval_tasks = ("coco_panoptic", "refcoco", "coco_vgd", "ref_ytvos", "ytvos")   # of config.eval
    config.max_nonfinite_steps = 10        # this many skipped (non-finite) steps in a row stop the run
    config.profile_steps = ""              # "A,B": a jax.profiler trace of steps A..B in WORKDIR/profile
    config.fast_compile = False            # XLA backend optimisation off (faster compiles, slower steps)
    config.partitioner = "gspmd"           # of the train step; see x2sam_jax.train.step.CompiledStep
    config.peak_flops_per_device = 0.0     # FLOP/s of one device for the logged MFU; 0: by device kind
                                           # (x2sam_jax.train.flops.PEAK_FLOPS) or a measured matmul

    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1))
    config.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1,
                                                        auto=False))

    config.model = ml_collections.ConfigDict()
    config.model.preset = "tiny"           # x2sam_jax.config.x2sam_preset name
    config.model.tokenizer = "tiny"        # "tiny" (built-in BPE) or a tokenizer directory
    config.model.overrides = ml_collections.ConfigDict()   # nested X2SAMConfig field overrides
    config.model.compute_dtype = ""        # "" = the preset's (float32); "bfloat16" for mixed precision
    config.model.frozen_dtype = ""         # e.g. "bfloat16": store the frozen bases in bf16
    config.model.remat_policy = ""         # "": the preset's; else one REMAT_POLICIES key for every stack
    config.model.train_all = False         # True: train every parameter (no frozen ViT / LLM base)
    config.model.shared_negatives = False  # True: a micro-batch's referring phrases are negatives of each other
    config.model.init = ml_collections.ConfigDict(dict(qwen3_vl="", sam2="", stage1=""))

    config.data = ml_collections.ConfigDict()
    config.data.synthetic = ml_collections.ConfigDict(dict(
        root=config.get_ref("data_root"), num_images=300, num_videos=40, frames=6, size=(96, 128), seed=0,
        image_objects=(1, 2), video_objects=(1, 2), radius=(0.15, 0.28),
        sources=("coco_panoptic", "refcoco", "coco_vgd", "ref_ytvos", "ytvos")))
    config.data.root = ""                  # relative "root" paths of data.sources are read under it
    config.data.sources = ()               # dict specs {"type": ..., **kwargs} of real datasets
    config.data.global_batch_images = 4    # images per optimizer step, over all devices
    config.data.global_batch_clips = 1     # video clips per optimizer step
    config.data.images_per_device = 4      # the largest micro-batch per device (more: micro-steps)
    config.data.clips_per_device = 1
    config.data.repeat_threshold = 0.1
    # Repeat factors by source name (the others follow repeat_threshold); why: docs/results.md#2026-12-01-the-mixture
    config.data.repeats = ml_collections.ConfigDict(dict(coco_panoptic=1.5, refcoco=2.0, ref_ytvos=1.0,
                                                         ytvos19=1.0))
    config.data.num_threads = 2
    config.data.prefetch = 2
    config.data.num_workers = 0
    config.data.max_instances = 100        # stage 1: targets per image
    config.data.feature_kwargs = ml_collections.ConfigDict(dict(max_categories=16, clip_len=8))
    # Few bucket values: one program for image steps, one for video steps.
    config.data.buckets = ml_collections.ConfigDict(dict(
        seq_lengths=(512,), patch_counts=(512,), grids=(1,), frames=(1, 6), instances=(16,),
        conditions=(16,), regions=(4,), seg_tokens=(8,)))

    config.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-3, b1=0.9, b2=0.999, weight_decay=0.05, warmup_ratio=0.03, grad_clip=1.0,
        lr_multipliers=()))          # the recipe's 0.1 on the SAM encoder is for pretrained weights
    # LossConfig's fields (its defaults are X2SAM's), so that each can be overridden by name; the
    # tiny run changes two of them.
    config.loss = ml_collections.ConfigDict(dict(
        dataclasses.asdict(LossConfig()), num_points=1024,
        pairwise_class_weight=2.0))   # not in X2SAM: docs/results.md#2026-12-01-pairwise-class-loss

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
    ev.phrase_encoder = ""              # GCG recall: a bert-base-uncased directory (GLaMM); "" = bag of words
    # One value per dimension except text length and frames: image datasets share one program
    # per text bucket, clips another.
    ev.buckets = ml_collections.ConfigDict(dict(
        seq_lengths=(512,), patch_counts=(512,), grids=(1,), frames=(1, 6), instances=(16,),
        conditions=(32,), regions=(4,), seg_tokens=(8,)))
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
