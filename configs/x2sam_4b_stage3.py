"""Stage 3 of the X2SAM recipe: unified joint training on all tasks (design.md §3).

    python -m convert_weights.qwen3_vl --src Qwen3-VL-4B-Instruct/ --dst ckpt/qwen3_vl_4b \\
        --add-x2sam-tokens --position-mode sequential
    python -m convert_weights.sam2 --src sam2.1-hiera-large/ --dst ckpt/sam2_large
    python train.py --config configs/x2sam_4b_stage3.py --workdir runs/x2sam_4b_stage3 \\
        --config.model.init.qwen3_vl=ckpt/qwen3_vl_4b --config.model.init.sam2=ckpt/sam2_large \\
        [--config.model.init.stage1=runs/x2sam_4b_stage1] --config.data.root=datas

Model: ``x2sam_4b`` (Qwen3-VL-4B with LoRA r=128 on every LLM linear, SAM2.1 Hiera-L, the
Mask2Former heads with the mask memory, K=5), initialised from the converted Qwen3-VL and SAM2
checkpoints (and optionally the stage-1 segmentor's pixel decoder and decoder). Trainable: LoRA,
embed_tokens, lm_head, the ViT mergers, the projectors and the whole segmentor; frozen: the ViT
blocks and the LLM base weights (``x2sam_jax.models.x2sam.is_trainable``).

Data: the official training mix (``x2sam_qwen3_vl_4b_instruct_sam2.1_hiera_large_m2f_e1_gpu32_lora``),
image and video tasks, repeat factor r_d = max(1, sqrt(0.1 / f_d)), each optimizer step from one
dataset; 4 images per device per step, or 1 clip of 8 frames per device accumulated over 4
micro-steps; video clips sorted by length. Dataset roots follow the official ``datas/`` layout
under ``data.root``.

Recipe: 1 epoch, AdamW lr 1e-4 (SAM2 encoder 1e-5), betas (0.9, 0.999), weight decay 0.05, 3 %
warmup then cosine, gradient clipping 1.0, bf16 compute with float32 master weights, losses of
design.md §3 on all 10 decoder predictions plus the LM loss. The official run used 32 H800 GPUs
(global batch 128 images) and 3.3K GPU-hours.

What it should reach (paper, Table 6): COCO panoptic PQ 54.1 / mIoU 64.8 / mAP 45.8, RefCOCO/+/g
cIoU 84.0 / 78.4 / 81.9, ReasonSeg gIoU 71.1, VIPSeg VPQ 47.3, VSPW mIoU 65.1, Ref-YouTube-VOS
J&F 78.5, Ref-DAVIS17 79.0, ReVOS 69.9, YouTube-VOS 74.0 (evaluation: ``config.eval``).
"""

import os

import ml_collections

from configs import x2sam_tiny_synthetic


def dataset_mix() -> tuple:
    """Source specs of the official stage-3 training mix (``data.pipeline.materialize_source``);
    roots are relative to ``data.root``."""
    j = os.path.join
    image = [
        {"type": "llava", "root": j("img_chat", "llava")},
        {"type": "coco_panoptic", "root": j("img_genseg", "coco2017"), "split": "train2017"},
        {"type": "refcoco", "root": j("img_refseg", "refcocos"), "dataset": "refcoco"},
        {"type": "refcoco", "root": j("img_refseg", "refcocos"), "dataset": "refcoco+"},
        {"type": "refcoco", "root": j("img_refseg", "refcocos"), "dataset": "refcocog"},
        {"type": "LisaReasonSegSource", "root": j("img_reaseg", "lisa"), "split": "train"},
        {"type": "coco_vgd", "root": j("img_vgdseg", "coco_vgd"), "split": "train"},
    ] + [{"type": "grand_f", "root": j("img_gcgseg"), "subset": s} for s in ("grandf", "refcocog", "psg", "flickr")]
    video = [
        {"type": "video_chatgpt", "root": j("vid_chat", "video_chatgpt")},
        {"type": "vipseg", "root": j("vid_genseg", "vipseg_720p")},
        {"type": "youtube_vis", "root": j("vid_genseg", "ytvis19")},
        {"type": "vspw", "root": j("vid_genseg", "vspw_480p")},
        {"type": "ref_youtube_vos", "root": j("vid_refseg", "ytrvos21")},
        {"type": "ref_davis17", "root": j("vid_refseg", "davis17"), "split": "train"},
        {"type": "revos", "root": j("vid_reaseg", "revos")},
        {"type": "video_vgd", "root": j("vid_vgdseg", "ytvis_vgd"), "dataset": "yt19"},
        {"type": "video_vgd", "root": j("vid_vgdseg", "vipseg_vgd"), "dataset": "vipseg"},
        {"type": "youtube_vos", "root": j("vid_objseg", "ytvos19")},
        {"type": "mevis_gcg", "root": j("vid_gcgseg", "video_glamm")},
        {"type": "ytvos_gcg", "root": j("vid_gcgseg", "video_glamm")},
        {"type": "vidstg_gcg", "root": j("vid_gcgseg", "video_glamm"), "subset": "vidstg"},
        {"type": "vidstg_gcg", "root": j("vid_gcgseg", "video_glamm"), "subset": "hcstvg"},
        {"type": "glamm_video_gcg", "root": j("vid_gcgseg", "video_glamm")},
    ]
    return tuple(image + video)


def get_config() -> ml_collections.ConfigDict:
    config = x2sam_tiny_synthetic.get_config()
    config.stage = 3
    config.steps = 0                       # one epoch of the plan
    config.log_every = 10
    config.checkpoint_every = 2000
    config.keep_checkpoints = 2
    config.eval_every = 2000
    config.fast_compile = False

    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1

    config.model.preset = "x2sam_4b"
    config.model.tokenizer = ""            # REQUIRED: the converted Qwen3-VL directory (holds the tokenizer)
    config.model.compute_dtype = "bfloat16"
    config.model.frozen_dtype = "bfloat16"
    config.model.remat_policy = "dots"
    config.model.init.qwen3_vl = ""        # REQUIRED: convert_weights.qwen3_vl output (--add-x2sam-tokens)
    config.model.init.sam2 = ""            # REQUIRED: convert_weights.sam2 output
    config.model.init.stage1 = ""          # optional: a stage-1 training workdir

    config.data.root = "datas"             # relative source roots are read under it
    config.data.synthetic.sources = ()
    config.data.sources = dataset_mix()
    config.data.images_per_device = 4
    config.data.clips_per_device = 1
    config.data.video_accumulate_steps = 4
    config.data.repeat_threshold = 0.1
    config.data.num_workers = 8
    config.data.feature_kwargs = ml_collections.ConfigDict()   # FeatureConfig defaults (128 categories...)
    config.data.buckets = ml_collections.ConfigDict(dict(
        seq_lengths=(1024, 2048, 4096, 8192), patch_counts=(1024, 4096, 16384), grids=(1,), frames=(1, 8),
        instances=(16, 64, 128), conditions=(8, 32, 128), regions=(8, 32), seg_tokens=(8, 32, 128)))

    config.optimizer.lr = 1e-4
    config.optimizer.grad_clip = 1.0
    config.optimizer.lr_multipliers = (("segmentor.encoder", 0.1),)
    config.loss.num_points = 12544
    config.loss.shared_negatives = True    # design.md §7 (the official behaviour)
    return config
