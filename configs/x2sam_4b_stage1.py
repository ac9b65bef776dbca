"""Stage 1 of the X2SAM recipe: the class-agnostic segmentor on SA-1B.

    python -m convert_weights.sam2 --src sam2.1-hiera-large/ --dst ckpt/sam2_large
    python train.py --config configs/x2sam_4b_stage1.py --workdir runs/x2sam_4b_stage1 \\
        --config.model.init.sam2=ckpt/sam2_large --config.data.root=datas

Model: the x2sam_4b segmentor without the LLM (SAM2.1 Hiera-L, frozen; the Mask2Former pixel
decoder and masked-attention decoder from scratch; 200 queries; a linear [object, background]
head; no memory). Data: SA-1B (``datas/img_sam/SA1B``), every mask of an image a target of one
class, at most 100 per image. Recipe: ``x2sam_4b_base`` with gradient clipping 0.01, one epoch,
128 images per optimizer step. It should reach a segmentor whose pixel decoder and decoder
initialise stage 3 (``--config.model.init.stage1=runs/x2sam_4b_stage1``); the paper reports no
stage-1 numbers. ``scripts/rehearse.sh`` runs this config end to end on a miniature of SA-1B.
"""

import ml_collections

from configs import x2sam_4b_base


def get_config() -> ml_collections.ConfigDict:
    config = x2sam_4b_base.get_config()
    config.stage = 1
    config.model.tokenizer = ""            # no LLM in stage 1
    config.model.frozen_dtype = ""         # the frozen SAM2 encoder stays float32 (official: fp32 weights)
    config.data.sources = ({"type": "sa1b", "root": "img_sam/SA1B"},)
    config.data.global_batch_clips = 0     # images only
    # One program: every SA-1B image is one 1024 px frame with at most 100 (-> 128) masks.
    config.data.buckets = ml_collections.ConfigDict(dict(
        seq_lengths=(1,), patch_counts=(1,), grids=(1,), frames=(1,), instances=(128,), conditions=(1,),
        regions=(1,), seg_tokens=(1,)))
    config.optimizer.grad_clip = 0.01
    return config
