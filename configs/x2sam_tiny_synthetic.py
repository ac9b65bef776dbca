"""The tiny X2SAM trained on the built-in synthetic data, on CPU.

    python train.py --config configs/x2sam_tiny_synthetic.py --workdir runs/tiny

The synthetic dataset (coloured shapes over textured backgrounds in the COCO panoptic, RefCOCO and
Ref-YouTube-VOS formats, ``x2sam_jax.data.synthetic``) is generated into ``WORKDIR/synthetic`` on
the first run. The model is the ``tiny`` preset (SAM input 128 px, 8 queries, a 2-layer LLM with
LoRA, ~1.5 M parameters) sized to the tiny BPE tokenizer, trained from scratch with the stage-3
recipe: panoptic (generic) and referring images plus referring video clips, per-frame Hungarian
set losses on all decoder predictions plus the LM loss.

What it reaches (measured on a shared 2-core CPU, --config.fast_compile=True): the loss falls
from ~56 (mean of steps 1-10) to ~30 at step 300 (LM loss 6.5 -> 2.2, dice 3.7 -> 2.0, summed
over the 4 decoder predictions), and the mask IoU of the best-scoring query per condition on
training samples rises from 0.11 / 0.06 / 0.05 (untrained) to 0.52 / 0.35 / 0.39 (COCO panoptic /
RefCOCO / Ref-YouTube-VOS). Reaching the README targets (referring cIoU >= 0.75, generic mIoU
>= 0.7, video J&F >= 0.7) needs more steps and the evaluation of issue 12 (``eval_every`` and
``config.eval``).

Every field below can be overridden on the command line, e.g. ``--config.steps=1000
--config.checkpoint_every=100 --config.log_every=1 --config.data.images_per_device=2``.
Re-running the same command resumes from the latest complete checkpoint.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.stage = 3                       # 1: class-agnostic segmentor (no LLM); 3: unified training
    config.seed = 0
    config.steps = 300                     # optimizer steps (0: num_epochs of the mixture plan)
    config.num_epochs = 1
    config.log_every = 10
    config.checkpoint_every = 50
    config.keep_checkpoints = 2
    config.async_checkpoints = True
    config.eval_every = 0                  # 0 = never; else x2sam_jax.eval.evaluate every N steps
    config.max_nonfinite_steps = 10        # this many skipped (non-finite) steps in a row stop the run
    config.fast_compile = False            # XLA backend optimisation off (faster compiles, slower steps)
    config.partitioner = "gspmd"           # of the train step; see x2sam_jax.train.step.CompiledStep

    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    config.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1,
                                                        auto=False))

    config.model = ml_collections.ConfigDict()
    config.model.preset = "tiny"           # x2sam_jax.config.x2sam_preset name
    config.model.tokenizer = "tiny"        # "tiny" (built-in BPE) or a tokenizer directory
    config.model.overrides = ml_collections.ConfigDict()   # nested X2SAMConfig field overrides
    config.model.compute_dtype = ""        # "" = the preset's (float32); "bfloat16" for mixed precision
    config.model.frozen_dtype = ""         # e.g. "bfloat16": store the frozen bases in bf16
    config.model.remat = "none"            # x2sam_jax.layers.scan.REMAT_POLICIES key for every stack
    config.model.train_all = False         # True: train every parameter (no frozen ViT / LLM base)
    config.model.init = ml_collections.ConfigDict(dict(qwen3_vl="", sam2="", stage1=""))

    config.data = ml_collections.ConfigDict()
    config.data.synthetic = ml_collections.ConfigDict(dict(
        root="", num_images=200, num_videos=20, frames=8, size=(120, 160), seed=0,
        sources=("coco_panoptic", "refcoco", "ref_ytvos")))
    config.data.root = ""                  # relative "root" paths of data.sources are read under it
    config.data.sources = ()               # dict specs {"type": ..., **kwargs} of real datasets
    config.data.images_per_device = 4
    config.data.clips_per_device = 1
    config.data.video_accumulate_steps = 2
    config.data.repeat_threshold = 0.1
    config.data.num_threads = 2
    config.data.prefetch = 2
    config.data.num_workers = 0
    config.data.max_instances = 100        # stage 1: targets per image
    config.data.feature_kwargs = ml_collections.ConfigDict(dict(max_categories=16))
    # Few bucket values: one program for image steps, one for video steps.
    config.data.buckets = ml_collections.ConfigDict(dict(
        seq_lengths=(512, 1024), patch_counts=(512,), grids=(1,), frames=(1, 8), instances=(16,),
        conditions=(16,), regions=(1,), seg_tokens=(16,)))

    config.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-3, b1=0.9, b2=0.999, weight_decay=0.05, warmup_ratio=0.03, grad_clip=1.0,
        lr_multipliers=(("segmentor.encoder", 0.1),)))
    config.loss = ml_collections.ConfigDict(dict(
        class_weight=2.0, mask_weight=5.0, dice_weight=5.0, no_object_weight=0.1, num_points=1024,
        oversample_ratio=3.0, importance_sample_ratio=0.75, lm_weight=1.0, shared_negatives=False))

    config.eval = ml_collections.ConfigDict()   # the evaluation helper's section (x2sam_jax.eval)
    return config
