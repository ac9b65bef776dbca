"""Stage 1 of the X2SAM recipe: the class-agnostic segmentor on SA-1B (design.md §3).

    python -m convert_weights.sam2 --src sam2.1-hiera-large/ --dst ckpt/sam2_large
    python train.py --config configs/x2sam_4b_stage1.py --workdir runs/x2sam_4b_stage1 \\
        --config.model.init.sam2=ckpt/sam2_large --config.data.root=datas

Model: the x2sam_4b segmentor without the LLM (``ClassAgnosticSegmentor``): SAM2.1 Hiera-L
(frozen) + the Mask2Former pixel decoder and masked-attention decoder (from scratch), 200
queries, a linear [object, background] head, no memory (images). Data: SA-1B, every mask of an
image a target of class 0 (at most 100 per image), 1024 px. Recipe (official
``x2sam_sam2.1_hiera_large_m2f_e1_gpu32``): 1 epoch, global batch 128 (4 per device on 32
devices), AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0.05, gradient clipping 0.01, 3 %
linear warmup then cosine, bf16 compute. Hungarian matching and mask losses on 12,544 points.

What it should reach: a class-agnostic segmentor whose decoder initialises stage 3 (the official
run evaluates it on COCO panoptic with one class; the paper gives no stage-1 numbers). Its
``segmentor.pixel_decoder`` / ``segmentor.decoder`` weights feed
``configs/x2sam_4b_stage3.py`` through ``--config.model.init.stage1=runs/x2sam_4b_stage1``.
The ``sa1b`` source (``x2sam_jax/data/sources/sa1b.py``) reads SA-1B's per-image JSON files.
"""

import ml_collections

from configs import x2sam_tiny_synthetic


def get_config() -> ml_collections.ConfigDict:
    config = x2sam_tiny_synthetic.get_config()
    config.stage = 1
    config.steps = 0                       # one epoch of the plan
    config.log_every = 10
    config.checkpoint_every = 2000
    config.keep_checkpoints = 2
    config.fast_compile = False

    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1    # FSDP over every device

    config.model.preset = "x2sam_4b"
    config.model.tokenizer = ""            # no LLM in stage 1
    config.model.compute_dtype = "bfloat16"
    config.model.remat_policy = "dots"
    config.model.init.sam2 = ""            # REQUIRED: convert_weights.sam2 output of sam2.1-hiera-large

    config.data.synthetic.sources = ()
    config.data.root = "datas"             # relative source roots are read under it
    config.data.sources = ({"type": "sa1b", "root": "img_sam/SA1B"},)
    config.data.images_per_device = 4
    config.data.max_instances = 100
    config.data.feature_kwargs = ml_collections.ConfigDict()
    config.data.num_workers = 8
    config.data.buckets = ml_collections.ConfigDict(dict(
        seq_lengths=(1,), patch_counts=(1,), grids=(1,), frames=(1,), instances=(128,), conditions=(1,),
        regions=(1,), seg_tokens=(1,)))

    config.optimizer.lr = 1e-4
    config.optimizer.grad_clip = 0.01
    config.optimizer.lr_multipliers = (("segmentor.encoder", 0.1),)   # the encoder is frozen anyway
    config.loss.num_points = 12544
    return config
