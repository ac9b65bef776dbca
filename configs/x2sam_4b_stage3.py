"""Stage 3 of the X2SAM recipe: unified joint training on every image and video task.

    python -m convert_weights.qwen3_vl --src Qwen3-VL-4B-Instruct/ --dst ckpt/qwen3_vl_4b \\
        --add-x2sam-tokens --position-mode sequential
    python -m convert_weights.sam2 --src sam2.1-hiera-large/ --dst ckpt/sam2_large
    python train.py --config configs/x2sam_4b_stage3.py --workdir runs/x2sam_4b_stage3 \\
        --config.model.tokenizer=ckpt/qwen3_vl_4b --config.model.init.qwen3_vl=ckpt/qwen3_vl_4b \\
        --config.model.init.sam2=ckpt/sam2_large --config.model.init.stage1=runs/x2sam_4b_stage1 \\
        --config.data.root=datas
    python eval.py --config configs/x2sam_4b_stage3.py --checkpoint runs/x2sam_4b_stage3 \\
        --output runs/x2sam_4b_stage3/eval --config.data.root=datas

Model: ``x2sam_4b`` (Qwen3-VL-4B with LoRA r=128 on every LLM linear, SAM2.1 Hiera-L, the
Mask2Former heads with the mask memory, K=5), initialised from the converted Qwen3-VL and SAM2
checkpoints and the stage-1 segmentor. Data: the official training mix
(``x2sam_4b_base.stage3_train_sources``), each optimizer step from one dataset, repeat factors
max(1, sqrt(0.1 / f_d)); 128 images or 128 clips of 8 frames per step; the referring phrases of a
micro-batch are shared negatives (the official behaviour). Recipe: ``x2sam_4b_base`` (lr 1e-4,
SAM2 encoder 1e-5, clipping 1.0, one epoch, bf16).

What it should reach (paper, Table 6, through ``eval.py`` on ``config.eval``): COCO panoptic
PQ 54.1 / mIoU 64.8 / mAP 45.8, ADE20K (open vocabulary) 31.2 / 38.2 / 20.2, RefCOCO/+/g val
cIoU 84.0 / 78.4 / 81.9, ReasonSeg gIoU 71.1 / 68.5, GCG mIoU 67.1 / 65.2, COCO-Int mIoU 67.7 /
70.3, COCO-VGD AP 45.9 / 48.5, VIPSeg VPQ 47.3, VSPW mIoU 65.1, YouTube-VIS19 mAP 69.9 (server),
YouTube-VIS21 mAP 60.3 (server), Ref-YouTube-VOS J&F 78.5 (server), Ref-DAVIS17 79.0, ReVOS
69.9, YouTube-VOS19 74.0 (server), V-VGD AP 73.8 / 55.4, V-GCG mIoU 75.8 (the mean of VideoGLaMM's
three sets; Table 18: METEOR 16.6, CIDEr 43.2, recall 42.0); chat (Tables 20, 21): MME 1701 / 601
(perception / cognition), MMBench 83.5, SEED-Bench 76.0, POPE 88.2, AI2D 82.0, Video-MME 74.4, MVBench
63.1, MLVU 67.1, LongVideoBench 57.4. ``scripts/rehearse.sh`` runs the whole recipe on a miniature of
every dataset.
"""

import ml_collections

from configs import x2sam_4b_base


def get_config() -> ml_collections.ConfigDict:
    config = x2sam_4b_base.get_config()
    config.stage = 3
    config.eval_every = 2000
    config.eval_max_samples = 64           # per dataset, in the training loop's evaluations
    config.eval_tasks = ("coco_panoptic", "refcoco_val", "coco_vgd_point", "vipseg", "ref_davis17", "revos")

    config.model.tokenizer = ""            # REQUIRED: the converted Qwen3-VL directory (holds the tokenizer)
    config.model.init.qwen3_vl = ""        # REQUIRED: convert_weights.qwen3_vl output (--add-x2sam-tokens)
    config.model.init.sam2 = ""            # REQUIRED: convert_weights.sam2 output
    config.model.init.stage1 = ""          # the stage-1 training workdir

    config.data.sources = x2sam_4b_base.stage3_train_sources()
    # Buckets: text and patches grow together (an image's tokens are most of the text), and so do
    # an image's targets, conditions and <SEG> tokens: tied, they take one position each, so the
    # plan holds 30 programs (train.compile_plan; the log lists them), all compiled before step 1:
    # 24 with the segmentor and 6 of the LLM alone for the chat sources, whose batches have no frames.
    # 1664 patches (13 x 128, whole blocks for the fused attention kernels) hold a COCO image of
    # up to 640 x 640 (1600): 1.04-1.6x its patches instead of the 3.4x of a 4096 bucket.
    config.data.buckets = ml_collections.ConfigDict(dict(
        seq_lengths=(2048, 4096, 8192), patch_counts=(1664, 4096, 16384), grids=(1,), frames=(1, 8),
        instances=(16, 128), conditions=(16, 128), regions=(8, 32), seg_tokens=(16, 128),
        tied=(("seq_lengths", "patch_counts"), ("instances", "conditions", "seg_tokens"))))
    config.model.shared_negatives = True
    config.eval = eval_config(config)
    return config


def eval_config(config) -> ml_collections.ConfigDict:
    """``x2sam_jax.eval.evaluate``'s section: the paper's benchmarks under ``data.root``."""
    ev = ml_collections.ConfigDict()
    ev.data_root = config.data.get_ref("root")
    ev.seed = config.get_ref("seed")
    ev.batch_size = 8                      # global rows per batch
    ev.max_samples = 0                     # 0 = every sample
    ev.fast_compile = None
    ev.max_new_tokens = 256                # GCG captions
    ev.phrase_encoder = ""                 # GCG recall: a bert-base-uncased directory (GLaMM); "" = bag of words
    # Qwen3-VL's video budget (25,165,824 pixels over all frames) is at most 49,152 patches and
    # 12,288 tokens: a 64-frame chat video or a 16-frame 720p GCG clip needs the largest buckets
    # (compiled only when a batch needs them).
    ev.buckets = ml_collections.ConfigDict(dict(
        seq_lengths=(2048, 8192, 16384), patch_counts=(1664, 4096, 16384, 49152), grids=(1,), frames=(1, 8, 16),
        instances=(128,), conditions=(256,), regions=(32,), seg_tokens=(128,)))
    ev.feature = ml_collections.ConfigDict(dict(clip_len=8))   # video GCG: 16 (its dataset entries)
    ev.datasets = ml_collections.ConfigDict({**x2sam_4b_base.paper_benchmarks(),
                                             **x2sam_4b_base.paper_chat_benchmarks()})
    ev.averages = ml_collections.ConfigDict(x2sam_4b_base.paper_averages())
    return ev
