"""The X2SAM recipe's shared settings: what stage 1 (``x2sam_4b_stage1.py``) and stage 3
(``x2sam_4b_stage3.py``) have in common, and the datasets they read (``docs/recipe.md``).

Not a run of its own: the two stage configs start from ``get_config()`` and set what differs.
Every number is the official recipe's (``x2sam_qwen3_vl_4b_sam2.1_hiera_large_m2f_e1_gpu32``):
AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0.05, 3 % linear warmup then cosine, one epoch,
bf16 compute over float32 master weights, 12,544 loss points, global batch 128 images per
optimizer step (4 per device on 32 GPUs) and 128 clips of 8 frames (1 per device, 4 micro-steps).

The global batch is the recipe's, whatever the cluster: the loop splits it into a per-device
micro-batch (at most ``images_per_device`` / ``clips_per_device``) and gradient-accumulation
micro-steps (``x2sam_jax.data.mixture.split_global_batch``), so 8, 32 or 256 devices take the
same optimizer steps over the same samples; a split that does not divide is an error at start-up.
Loss settings are ``x2sam_jax.train.losses.LossConfig``'s defaults (X2SAM's), copied into ``config.loss``.
"""

import dataclasses
import os

import ml_collections

from x2sam_jax.train.losses import LossConfig

j = os.path.join


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.stage = 3
    config.seed = 0
    config.steps = 0                       # 0: num_epochs of the mixture plan
    config.num_epochs = 1
    config.log_every = 10
    config.checkpoint_every = 1000
    config.keep_checkpoints = 2
    config.async_checkpoints = True
    config.eval_every = 0
    config.eval_max_samples = 0
    config.eval_tasks = ()
    config.max_nonfinite_steps = 10
    config.profile_steps = ""              # "A,B": a jax.profiler trace of steps A..B in WORKDIR/profile
    config.fast_compile = False
    config.partitioner = "gspmd"
    config.peak_flops_per_device = 0.0     # FLOP/s of one device for the logged MFU; 0: by device kind
                                           # (x2sam_jax.train.flops.PEAK_FLOPS) or a measured matmul
    # Programs the bucket plan may compile; all of them are compiled before step 1 (0 = compile
    # lazily, on first use). See x2sam_jax.train.compile_plan.
    config.max_programs = 32

    # FSDP over every device; dcn_data / dcn_fsdp > 1 split data / fsdp over TPU slices or GPU
    # hosts (x2sam_jax.sharding.device_grid).
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1))
    config.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1,
                                                        auto=False))

    config.model = ml_collections.ConfigDict()
    config.model.preset = "x2sam_4b"
    config.model.tokenizer = ""            # stage 3: the converted Qwen3-VL directory (holds the tokenizer)
    config.model.overrides = ml_collections.ConfigDict()
    config.model.compute_dtype = "bfloat16"
    config.model.frozen_dtype = "bfloat16"
    # "": the preset's policy for each stack (x2sam_jax.config.x2sam_preset: the trained encoders,
    # the pixel decoder, the memory and each video frame recompute everything; the LLM and the mask
    # decoder keep q/k/v and the attention output). One policy for all ("dots") kept every matmul
    # output of every stack: 3.8x the per-device memory at one image, 48x for a clip
    # (benchmarks/RESULTS.md).
    config.model.remat_policy = ""
    config.model.train_all = False
    config.model.shared_negatives = False  # True: a micro-batch's referring phrases are negatives of each other
    config.model.init = ml_collections.ConfigDict(dict(qwen3_vl="", sam2="", stage1=""))

    config.data = ml_collections.ConfigDict()
    config.data.root = "datas"             # the official data tree; relative source roots are read under it
    config.data.sources = ()
    config.data.global_batch_images = 128  # images per optimizer step, over all devices
    config.data.global_batch_clips = 128   # video clips per optimizer step, over all devices
    config.data.images_per_device = 4      # the largest micro-batch per device (memory), images
    config.data.clips_per_device = 1       # ... and clips
    config.data.repeat_threshold = 0.1     # r_d = max(1, sqrt(0.1 / f_d))
    config.data.repeats = ml_collections.ConfigDict()   # {source name: factor}: none in the recipe
    config.data.num_threads = 8
    config.data.prefetch = 8               # batches; at least num_threads (Grain)
    config.data.num_workers = 8
    config.data.max_instances = 100
    config.data.feature_kwargs = ml_collections.ConfigDict()   # FeatureConfig defaults (128 categories...)
    config.data.buckets = ml_collections.ConfigDict()

    config.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-4, b1=0.9, b2=0.999, weight_decay=0.05, warmup_ratio=0.03, grad_clip=1.0,
        lr_multipliers=(("segmentor.encoder", 0.1),)))
    # LossConfig's defaults are X2SAM's; listed here so that each can be overridden by name.
    config.loss = ml_collections.ConfigDict(dataclasses.asdict(LossConfig()))
    return config


def stage3_train_sources() -> tuple:
    """The official stage-3 training mix, roots relative to ``data.root`` (the official tree)."""
    image = [
        {"type": "llava", "root": j("img_chat", "llava")},
        {"type": "coco_panoptic", "root": j("img_genseg", "coco2017"), "split": "train2017"},
        {"type": "refcoco", "root": j("img_refseg", "refcocos"), "dataset": "refcoco"},
        {"type": "refcoco", "root": j("img_refseg", "refcocos"), "dataset": "refcoco+"},
        {"type": "refcoco", "root": j("img_refseg", "refcocos"), "dataset": "refcocog"},
        {"type": "LisaReasonSegSource", "root": j("img_reaseg", "lisa"), "split": "train"},
        {"type": "coco_vgd", "root": j("img_vgdseg", "coco_vgd"), "split": "train"},
    ] + [{"type": "grand_f", "root": j("img_gcgseg", "grand_f"), "subset": s}
         for s in ("grandf", "refcocog", "psg", "flickr")]
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


def paper_benchmarks() -> dict:
    """The evaluation datasets of the paper's Table 6 (``eval.datasets`` of stage 3): name ->
    {"source", "options", "feature"}, roots relative to ``eval.data_root``. Splits without public
    ground truth (YouTube-VIS 2019 valid, Ref-YouTube-VOS valid, YouTube-VOS 2019 valid) are
    written as the benchmark server's submission archive instead of scored."""
    refcocos = j("img_refseg", "refcocos")
    vgd = dict(type="coco_vgd", root=j("img_vgdseg", "coco_vgd"), split="val")
    interactive = dict(type="coco_interactive", root=j("img_intseg", "coco_int"), split="val")
    benchmarks = {
        # I-Gen: PQ / mIoU / mAP from one forward over the whole vocabulary
        "coco_panoptic": dict(source=dict(type="coco_panoptic", root=j("img_genseg", "coco2017"), split="val2017"),
                              options=dict(metrics=("PQ", "mIoU", "AP"))),
        # I-OV: ADE20K panoptic / semantic / instance with the COCO-trained model
        "ade20k_panoptic": dict(source=dict(type="ade20k_panoptic", root=j("img_ovseg", "ade20k"), split="val"),
                                options=dict(metrics=("PQ", "mIoU", "AP"))),
        # I-Rea: ReasonSeg gIoU (val and test)
        "reasonseg_val": dict(source=dict(type="lisa", root=j("img_reaseg", "lisa"), split="val")),
        "reasonseg_test": dict(source=dict(type="lisa", root=j("img_reaseg", "lisa"), split="test")),
        # I-GCG: GranD-f val / test (captions generated, phrases segmented; METEOR / CIDEr need Java)
        "grandf_gcg_val": dict(source=dict(type="grandf_gcg", root=j("img_gcgseg", "grand_f"), subset="val"),
                               options=dict(captions=True)),
        "grandf_gcg_test": dict(source=dict(type="grandf_gcg", root=j("img_gcgseg", "grand_f"), subset="test"),
                                options=dict(captions=True)),
        # I-Int / I-VGD: point and box prompts
        "coco_interactive_point": dict(source=dict(interactive, prompt_kinds=("point",))),
        "coco_interactive_box": dict(source=dict(interactive, prompt_kinds=("box",)),
                                     feature=dict(eval_prompt_kind="box")),
        "coco_vgd_point": dict(source=dict(vgd, prompt_kinds=("point",))),
        "coco_vgd_box": dict(source=dict(vgd, prompt_kinds=("box",)), feature=dict(eval_prompt_kind="box")),
        # V-Gen: VIPSeg VPQ, VSPW mIoU / mVC, YouTube-VIS 2019 (server)
        "vipseg": dict(source=dict(type="vipseg", root=j("vid_genseg", "vipseg_720p"), split="val"),
                       options=dict(metrics=("VPQ",))),
        "vspw": dict(source=dict(type="vspw", root=j("vid_genseg", "vspw_480p"), split="val"),
                     options=dict(metrics=("mIoU", "mVC"))),
        "ytvis19": dict(source=dict(type="ytvis19", root=j("vid_genseg", "ytvis19"), split="valid"),
                        options=dict(metrics=("AP",))),
        # V-OV: YouTube-VIS 2021 instance mAP (server)
        "ytvis21": dict(source=dict(type="ytvis21", root=j("vid_ovseg", "ytvis21"), split="valid"),
                        options=dict(metrics=("AP",))),
        # V-Ref: Ref-YouTube-VOS (server) and Ref-DAVIS17 J&F, one sample per expression
        "ref_ytvos": dict(source=dict(type="ref_ytvos", root=j("vid_refseg", "ytrvos21"), split="valid",
                                      group="expression")),
        "ref_davis17": dict(source=dict(type="ref_davis17", root=j("vid_refseg", "davis17"), split="val",
                                        group="expression")),
        # V-Rea: ReVOS J&F (referring / reasoning / all)
        "revos": dict(source=dict(type="revos", root=j("vid_reaseg", "revos"), split="valid")),
        # V-Obj: YouTube-VOS 2019 with the first-frame mask (server)
        "ytvos19": dict(source=dict(type="ytvos19", root=j("vid_objseg", "ytvos19"), split="valid"),
                        feature=dict(eval_prompt_kind="mask")),
        # V-GCG ("V-GLaMM"): VideoGLaMM's benchmark as X2SAM evaluates it, the mean of these three
        # rows (results.md's "V-GCG mean"): clips of 16 frames spread over the video, the caption
        # generated over them, each phrase segmented on all 16 (the official evaluation runs the
        # segmentor on the LLM's frames), METEOR / CIDEr / mIoU / recall per clip.
        "video_gcg_test": dict(source=dict(type="video_gcg", root=j("vid_gcgseg", "video_glamm"), split="test"),
                               options=dict(captions=True), feature=dict(clip_len=16)),
        "mevis_gcg_val": dict(source=dict(type="mevis_gcg", root=j("vid_gcgseg", "video_glamm"), split="valid_u"),
                              options=dict(captions=True), feature=dict(clip_len=16)),
        "vidstg_gcg_val": dict(source=dict(type="vidstg_gcg", root=j("vid_gcgseg", "video_glamm"), split="val",
                                           frame_suffix=".png"),
                               options=dict(captions=True), feature=dict(clip_len=16)),
        # V-VGD: YouTube-VIS 2019 / VIPSeg VGD AP (point prompts)
        "ytvis19_vgd": dict(source=dict(type="ytvis19_vgd", root=j("vid_vgdseg", "ytvis_vgd"), split="val",
                                        prompt_kinds=("point",))),
        "vipseg_vgd": dict(source=dict(type="vipseg_vgd", root=j("vid_vgdseg", "vipseg_vgd"), split="val",
                                       prompt_kinds=("point",))),
    }
    # I-Ref: cIoU / gIoU, one forward per expression (RefCOCO/+ unc splits, RefCOCOg umd)
    for name, splits in (("refcoco", ("val", "testA", "testB")), ("refcocop", ("val", "testA", "testB")),
                         ("refcocog", ("val", "test"))):
        for split in splits:
            benchmarks[f"{name}_{split}"] = dict(source=dict(type=name, root=refcocos, split=split))
    return benchmarks


def paper_chat_benchmarks() -> dict:
    """The image and video chat benchmarks of the paper's chat tables (``eval.datasets`` of stage
    3 beside ``paper_benchmarks``), in VLMEvalKit's ``LMUData`` folder as the official evaluation
    reads them (Hugging Face dataset folders for the videos); X2SAM answers in at most 16 greedy
    tokens and sees 64 frames of a video. Video-MME and LongVideoBench are read without subtitles
    (``subtitles=True`` in their source: the "w/ subtitles" variant, docs/data.md)."""
    lmu = "LMUData"
    # The readers' default files: MME.tsv, MMBench_DEV_EN.tsv, SEEDBench_IMG.tsv, POPE.tsv, AI2D_TEST.tsv.
    image = {name: dict(type=name) for name in ("mme", "mmbench", "seed_bench", "pope", "ai2d")}
    video = {"videomme": ("videomme", "datasets--lmms-lab--Video-MME"),
             "mvbench": ("mvbench", "datasets--OpenGVLab--MVBench"),
             "mlvu": ("mlvu", j("datasets--MLVU--MVLU", "MLVU")),
             "longvideobench": ("longvideobench", "datasets--longvideobench--LongVideoBench")}
    out = {name: dict(source=dict(source, root=lmu), max_new_tokens=16) for name, source in image.items()}
    out.update({name: dict(source=dict(type=kind, root=j(lmu, folder), num_frames=64), max_new_tokens=16)
                for name, (kind, folder) in video.items()})
    for name in ("videomme", "longvideobench"):
        out[name]["source"]["subtitles"] = False
    return out


def paper_averages() -> dict:
    """Results rows that are means of benchmark rows (``eval.averages``): the paper's V-GCG
    number is the mean over VideoGLaMM's three evaluation sets."""
    return {"vgcg_mean": ("video_gcg_test", "mevis_gcg_val", "vidstg_gcg_val")}
