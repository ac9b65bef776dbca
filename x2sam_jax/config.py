"""Architecture configs: frozen dataclasses, one preset per released checkpoint.

Each component owns one section below. Configs round-trip through JSON (``to_dict`` /
``from_dict``), which is how checkpoints record the architecture they hold (config.json).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

C = TypeVar("C")


def to_dict(config) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Rebuilds a (nested) config dataclass from ``to_dict`` output; unknown fields are an error."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config fields {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        try:
            kwargs[name] = _coerce(hints[name], value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{cls.__name__}.{name}: {error}") from None
    return cls(**kwargs)


# The one naming scheme of the stacking/attention fields, in every model config:
#   scan_layers: bool            lax.scan over the stacked layers (False: unrolled)
#   remat_policy: str            x2sam_jax.layers.scan.remat_policy (a REMAT_POLICIES key or names:...)
#   attention_implementation     None (chosen by platform/shape) or x2sam_jax.layers.attention.IMPLEMENTATIONS
#   attention_query_chunk: int   queries per block of the chunked attention (0 = automatic)


RUN_FIELDS = ("scan_layers", "remat_policy", "attention_implementation", "attention_query_chunk", "scan_frames",
              "frame_remat_policy")


def with_run_settings(config: C, source) -> C:
    """``config`` with the ``RUN_FIELDS`` of ``source``, section by section (nested configs of the
    same type). These change no parameter, only how the model is executed (e.g. a preset's
    training defaults applied to a config read from converted files)."""
    changes = {}
    for field in dataclasses.fields(config):
        mine, theirs = getattr(config, field.name), getattr(source, field.name, None)
        if field.name in RUN_FIELDS:
            changes[field.name] = theirs
        elif dataclasses.is_dataclass(mine) and type(theirs) is type(mine):
            changes[field.name] = with_run_settings(mine, theirs)
    return dataclasses.replace(config, **changes)


def _coerce(hint, value):
    origin = typing.get_origin(hint)
    if value is None:
        return None
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return from_dict(arg, value)
        return _coerce(next(a for a in typing.get_args(hint) if a is not type(None)), value)
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in value)
        return tuple(_coerce(a, v) for a, v in zip(args, value)) if args else tuple(value)
    if origin is typing.Literal and value not in typing.get_args(hint):
        raise ValueError(f"expected one of {list(typing.get_args(hint))}, got {value!r}")
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ValueError(f"expected {hint.__name__}, got {value!r}")   # a bad value in a config.json
    return value


# ----------------------------------------------------------------------------------------------
# SAM2 / SAM2.1 Hiera mask encoder + FPN neck            (owner: models/hiera.py)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HieraConfig:
    """SAM2 image encoder: Hiera trunk + FPN neck (transformers' Sam2VisionConfig/Sam2HieraDetConfig).

    Field names follow transformers. The default is SAM2.1 Hiera-T; ``hiera_preset(name)`` gives
    the four released sizes. ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype.
    """

    hidden_size: int = 96                       # stage-0 width (patch embedding)
    num_attention_heads: int = 1                # stage-0 heads (recorded; per-stage list is used)
    num_channels: int = 3
    patch_kernel_size: tuple[int, int] = (7, 7)
    patch_stride: tuple[int, int] = (4, 4)
    patch_padding: tuple[int, int] = (3, 3)
    query_stride: tuple[int, int] = (2, 2)      # query max-pool at the first block of stages 1..q
    num_query_pool_stages: int = 3
    blocks_per_stage: tuple[int, ...] = (1, 2, 7, 2)
    embed_dim_per_stage: tuple[int, ...] = (96, 192, 384, 768)
    num_attention_heads_per_stage: tuple[int, ...] = (1, 2, 4, 8)
    window_size_per_stage: tuple[int, ...] = (8, 4, 14, 7)
    global_attention_blocks: tuple[int, ...] = (5, 7, 9)
    window_positional_embedding_background_size: tuple[int, int] = (7, 7)
    mlp_ratio: float = 4.0
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    fpn_hidden_size: int = 256
    fpn_top_down_levels: tuple[int, ...] = (2, 3)
    num_feature_levels: int = 3
    image_size: int = 1024
    dtype: str = "float32"
    param_dtype: str = "float32"
    # Run each maximal run of identical blocks (same widths, window, no pooling) with lax.scan
    # over their parameters stacked at call time; the checkpoint layout does not change.
    scan_layers: bool = False
    remat_policy: str = "none"                   # x2sam_jax.layers.scan.remat_policy
    # x2sam_jax.layers.attention: None = by platform and shape, or "xla", "query_chunked",
    # "cudnn", "splash". All compute the same softmax attention.
    attention_implementation: str | None = None
    attention_query_chunk: int = 0               # 0 = automatic

    @property
    def backbone_channel_list(self) -> tuple[int, ...]:
        """Trunk widths deepest first, the order of the FPN lateral convs (``neck.convs.{i}``)."""
        return tuple(reversed(self.embed_dim_per_stage))


def hiera_preset(name: str, **overrides) -> HieraConfig:
    """SAM2.1 image-encoder presets with the hub numbers (facebook/sam2.1-hiera-{name})."""
    presets = {
        "tiny": dict(hidden_size=96, num_attention_heads=1, blocks_per_stage=(1, 2, 7, 2),
                     embed_dim_per_stage=(96, 192, 384, 768), num_attention_heads_per_stage=(1, 2, 4, 8),
                     window_size_per_stage=(8, 4, 14, 7), global_attention_blocks=(5, 7, 9),
                     window_positional_embedding_background_size=(7, 7)),
        "small": dict(hidden_size=96, num_attention_heads=1, blocks_per_stage=(1, 2, 11, 2),
                      embed_dim_per_stage=(96, 192, 384, 768), num_attention_heads_per_stage=(1, 2, 4, 8),
                      window_size_per_stage=(8, 4, 14, 7), global_attention_blocks=(7, 10, 13),
                      window_positional_embedding_background_size=(7, 7)),
        "base_plus": dict(hidden_size=112, num_attention_heads=2, blocks_per_stage=(2, 3, 16, 3),
                          embed_dim_per_stage=(112, 224, 448, 896),
                          num_attention_heads_per_stage=(2, 4, 8, 16),
                          window_size_per_stage=(8, 4, 14, 7), global_attention_blocks=(12, 16, 20),
                          window_positional_embedding_background_size=(14, 14)),
        "large": dict(hidden_size=144, num_attention_heads=2, blocks_per_stage=(2, 6, 36, 4),
                      embed_dim_per_stage=(144, 288, 576, 1152), num_attention_heads_per_stage=(2, 4, 8, 16),
                      window_size_per_stage=(8, 4, 16, 8), global_attention_blocks=(23, 33, 43),
                      window_positional_embedding_background_size=(7, 7)),
    }
    if name not in presets:
        raise ValueError(f"unknown SAM2 Hiera preset {name!r}; choose one of {sorted(presets)}")
    return HieraConfig(**{**presets[name], **overrides})



# ----------------------------------------------------------------------------------------------
# Qwen3-VL vision encoder, Qwen3 text model, LoRA         (owner: models/qwen3_vl*.py, lora.py)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Qwen3TextConfig:
    """Qwen3 decoder of Qwen3-VL (numbers: Qwen3-VL-4B-Instruct text_config)."""

    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_layers: int = 36
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, ...] = (24, 20, 20)   # T, H, W frequency counts (sum = head_dim / 2)
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    scan_layers: bool = True          # lax.scan over the stacked layers (False: unrolled loop)
    remat_policy: str = "none"        # x2sam_jax.layers.scan.remat_policy
    attention_implementation: str | None = None   # x2sam_jax.layers.attention (None = automatic)
    attention_query_chunk: int = 0    # 0 = automatic
    dtype: str = "float32"            # compute dtype; parameters keep their own dtype

    @classmethod
    def qwen3_vl_2b(cls, **kw) -> "Qwen3TextConfig":
        return cls(**{**dict(hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16,
                             num_kv_heads=8, tie_word_embeddings=True), **kw})

    @classmethod
    def qwen3_vl_4b(cls, **kw) -> "Qwen3TextConfig":
        return cls(**kw)

    @classmethod
    def qwen3_vl_8b(cls, **kw) -> "Qwen3TextConfig":
        return cls(**{**dict(hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
                             num_kv_heads=8, tie_word_embeddings=False), **kw})

    @classmethod
    def from_hf(cls, text: dict, tie_word_embeddings: bool | None = None, **kw) -> "Qwen3TextConfig":
        """From an HF ``text_config`` dict (Qwen3VLTextConfig fields)."""
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        theta = rope.get("rope_theta", text.get("rope_theta", 5_000_000.0))
        if rope.get("rope_type", "default") not in ("default", None):
            raise ValueError(f"text_config.rope_parameters.rope_type={rope.get('rope_type')!r}: "
                             "only the default (unscaled) M-RoPE is implemented")
        if text.get("hidden_act", "silu") != "silu":
            raise ValueError(f"text_config.hidden_act={text['hidden_act']!r}: only silu is implemented")
        heads = text["num_attention_heads"]
        tie = tie_word_embeddings if tie_word_embeddings is not None else text.get("tie_word_embeddings", False)
        return cls(**{**dict(
            vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"], num_layers=text["num_hidden_layers"],
            num_heads=heads, num_kv_heads=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or text["hidden_size"] // heads,
            rms_norm_eps=text.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),
            attention_bias=text.get("attention_bias", False), tie_word_embeddings=bool(tie)), **kw})

    def to_hf(self) -> dict:
        return dict(model_type="qwen3_vl_text", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                    intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                    num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                    head_dim=self.head_dim, hidden_act="silu", rms_norm_eps=self.rms_norm_eps,
                    attention_bias=self.attention_bias, tie_word_embeddings=self.tie_word_embeddings,
                    rope_parameters=dict(rope_type="default", rope_theta=self.rope_theta,
                                         mrope_section=list(self.mrope_section), mrope_interleaved=True))


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA on the LLM linears (x2sam_4b: r=128, alpha=256, dropout 0.05, all 7 projections)."""

    rank: int = 128
    alpha: float = 256.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                                       "gate_proj", "up_proj", "down_proj")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
    """Qwen3-VL: vision encoder + Qwen3 text model (+ optional LoRA on the LLM)."""

    vision: Qwen3VLVisionConfig | None = None   # defined below; annotations are lazy strings
    text: Qwen3TextConfig = Qwen3TextConfig()
    lora: LoRAConfig | None = None
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    position_mode: str = "mrope"      # "mrope" (stock Qwen3-VL) or "sequential" (released X2SAM)

    def __post_init__(self):
        if self.position_mode not in ("mrope", "sequential"):
            raise ValueError(f"Qwen3VLConfig.position_mode={self.position_mode!r}: "
                             "expected 'mrope' or 'sequential'")

    @classmethod
    def preset(cls, name: str, **overrides) -> "Qwen3VLConfig":
        """Qwen/Qwen3-VL-{2B,4B,8B}-Instruct: "2b", "4b", "8b" (hub vision + text numbers)."""
        texts = {"2b": Qwen3TextConfig.qwen3_vl_2b, "4b": Qwen3TextConfig.qwen3_vl_4b,
                 "8b": Qwen3TextConfig.qwen3_vl_8b}
        if name not in texts:
            raise ValueError(f"unknown Qwen3-VL preset {name!r}; known: {sorted(texts)}")
        return cls(**{**dict(vision=Qwen3VLVisionConfig.preset(name), text=texts[name]()), **overrides})

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "Qwen3VLConfig":
        """From an HF Qwen3-VL ``config.json`` dict (tie_word_embeddings read at the top level,
        falling back to text_config). ``overrides`` replace top-level fields (e.g. position_mode)."""
        if "text_config" not in hf:
            raise ValueError("config.json: no 'text_config' (not a Qwen3-VL checkpoint?)")
        text = hf["text_config"]
        tie = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        defaults = cls()
        kwargs = dict(
            vision=Qwen3VLVisionConfig.from_hf(hf["vision_config"]) if hf.get("vision_config") else None,
            text=Qwen3TextConfig.from_hf(text, tie_word_embeddings=tie),
            **{key: hf.get(key, getattr(defaults, key)) for key in
               ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")})
        return cls(**{**kwargs, **overrides})



@dataclasses.dataclass(frozen=True)
class Qwen3VLVisionConfig:
    """The Qwen3-VL ViT (``vision_config`` of the hub config.json); defaults = the 4B tower."""

    depth: int = 24
    hidden_size: int = 1024
    num_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu_pytorch_tanh"
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    out_hidden_size: int = 2560
    num_position_embeddings: int = 2304          # a square learned table (48 x 48)
    deepstack_visual_indexes: tuple[int, ...] = (5, 11, 17)
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6
    dtype: str = "float32"                       # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"                   # x2sam_jax.layers.scan.remat_policy
    # x2sam_jax.layers.attention (None = automatic). The chunked form bounds the score memory
    # to heads x chunk x N instead of heads x N x N for long packed batches.
    attention_implementation: str | None = None
    attention_query_chunk: int = 0               # 0 = automatic

    # Keys of an HF vision_config that map 1:1 onto fields of this class.
    _HF_KEYS = ("depth", "hidden_size", "num_heads", "intermediate_size", "hidden_act", "patch_size",
                "temporal_patch_size", "spatial_merge_size", "in_channels", "out_hidden_size",
                "num_position_embeddings", "deepstack_visual_indexes")

    def __post_init__(self):
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"Qwen3VLVisionConfig: hidden_size {self.hidden_size} must split into "
                             f"{self.num_heads} heads whose size is a multiple of 4 (2-D rotary)")
        side = round(self.num_position_embeddings ** 0.5)
        if side * side != self.num_position_embeddings:
            raise ValueError(f"Qwen3VLVisionConfig: num_position_embeddings {self.num_position_embeddings} "
                             "is not a square number")
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"Qwen3VLVisionConfig: deepstack_visual_indexes {bad} outside 0..{self.depth - 1}")

    @classmethod
    def from_hf(cls, vision_config: dict[str, Any], **overrides) -> "Qwen3VLVisionConfig":
        """Builds the config from the ``vision_config`` dict of an HF Qwen3-VL config.json."""
        kwargs = {k: vision_config[k] for k in cls._HF_KEYS if k in vision_config}
        for key in ("patch_size", "temporal_patch_size"):
            if isinstance(kwargs.get(key), (list, tuple)):  # HF allows [p, p]; only square is used
                values = set(kwargs[key])
                if len(values) != 1:
                    raise ValueError(f"vision_config.{key}={kwargs[key]}: only equal sizes are supported")
                kwargs[key] = values.pop()
        if "deepstack_visual_indexes" in kwargs:
            kwargs["deepstack_visual_indexes"] = tuple(int(i) for i in kwargs["deepstack_visual_indexes"])
        rope = vision_config.get("rope_parameters") or {}
        theta = rope.get("rope_theta", vision_config.get("rope_theta"))
        if theta is not None:
            kwargs["rope_theta"] = float(theta)
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def preset(cls, name: str, **overrides) -> "Qwen3VLVisionConfig":
        """Vision towers of the hub checkpoints: "2b", "4b", "8b" (Qwen/Qwen3-VL-*-Instruct)."""
        if name not in QWEN3_VL_VISION_PRESETS:
            raise ValueError(f"unknown Qwen3-VL vision preset {name!r}; known: {sorted(QWEN3_VL_VISION_PRESETS)}")
        return dataclasses.replace(QWEN3_VL_VISION_PRESETS[name], **overrides)


QWEN3_VL_VISION_PRESETS: dict[str, Qwen3VLVisionConfig] = {
    "2b": Qwen3VLVisionConfig(out_hidden_size=2048),
    "4b": Qwen3VLVisionConfig(),
    "8b": Qwen3VLVisionConfig(depth=27, hidden_size=1152, intermediate_size=4304,
                              out_hidden_size=4096, deepstack_visual_indexes=(8, 16, 24)),
}


# ----------------------------------------------------------------------------------------------
# X2SAM head: pixel decoder, mask decoder, mask memory, projectors, full model
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PixelDecoderConfig:
    """Mask2Former pixel decoder (MSDeformAttn encoder + one FPN step), as X2SAM configures it.

    ``feature_channels`` lists the input maps highest resolution first (SAM2 FPN order). The last
    ``num_encoder_levels`` of them go through the deformable encoder; the first
    ``num_fpn_levels`` get a lateral/output FPN step (X2SAM: 3 levels in, both at once for the
    256-squared map).
    """

    feature_channels: tuple[int, ...] = (256, 256, 256)
    num_encoder_levels: int = 3
    num_fpn_levels: int = 1
    hidden_size: int = 256                 # transformers' feature_size
    mask_feature_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_points: int = 4
    ffn_dim: int = 1024                    # transformers' encoder_feedforward_dim
    num_groups: int = 32                   # GroupNorm groups of the projections / FPN convs
    group_norm_eps: float = 1e-5
    layer_norm_eps: float = 1e-5
    attention_query_chunk: int = 0         # deformable sampling in query chunks (0 = automatic: 4096)
    scan_layers: bool = True
    remat_policy: str = "none"             # remat policy of the encoder-layer scan
    dtype: str = "float32"                 # compute dtype (sampling and softmax stay float32)
    param_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class MaskDecoderConfig:
    """Mask2Former masked-attention decoder + X2SAM text cross-attention + cosine class head."""

    hidden_size: int = 256
    num_queries: int = 200
    num_layers: int = 9                    # transformers' decoder_layers - 1
    num_levels: int = 3                    # layer i attends to pixel-decoder level i % num_levels
    num_heads: int = 8
    ffn_dim: int = 2048                    # transformers' dim_feedforward
    mask_feature_size: int = 256
    # Width of the pixel decoder's multi-scale maps (0: hidden_size). When it differs, each level
    # gets a 1x1 conv to hidden_size first (Mask2Former's / transformers' input_projections).
    feature_size: int = 0
    layer_norm_eps: float = 1e-5
    use_text_cross_attn: bool = True       # the paper's token-to-image attention
    zero_init_text_cross_attn: bool = True # its output projection starts at zero
    logit_scale_init: float = 2.659260036932778   # log(1 / 0.07)
    logit_clamp: float = 50.0              # class logits are clamped to +-logit_clamp
    padded_class_logit: float = -1e6       # logit of padded condition slots
    scan_layers: bool = True               # scan over rounds of num_levels layers (else unrolled)
    remat_policy: str = "none"
    attention_implementation: str | None = None   # x2sam_jax.layers.attention (None = automatic)
    attention_query_chunk: int = 0         # 0 = automatic
    dtype: str = "float32"                 # compute dtype (softmax, mask threshold, class head: float32)
    param_dtype: str = "float32"

    @property
    def level_feature_size(self) -> int:
        """Channels of the multi-scale maps the decoder reads."""
        return self.feature_size or self.hidden_size


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """mlm_projector (LLM states -> decoder width) and extra_projector (SAM stage-3 map -> LLM width)."""

    llm_hidden_size: int = 2560        # Qwen3-VL-4B text width
    decoder_hidden_size: int = 256     # mask decoder width (mlm_projector output)
    mask_encoder_channels: int = 576   # Hiera-L stage-3 trunk width (extra_projector input)
    downsample_ratio: float = 0.5      # pixel shuffle of the stage-3 map before extra_projector
    region_num_points: int = 256       # region sampler: points drawn per prompt mask
    region_pool_kernel: int = 4        # region sampler: average-pool kernel along the points
    dtype: str = "float32"             # compute dtype
    param_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """Mask memory of X2SAM: memory attention, memory encoder and the FIFO bank of K frames.

    Defaults are the released ``x2sam_4b`` values (SAM2 memory modules as configured by the
    official X2SAM config: memory_encoder_output_channels=256, scale strides [1, 2, 4], mask
    stride 4, num_maskmem=5).
    """

    hidden_size: int = 256                 # width of the features the memory attention refines
    memory_dim: int = 256                  # channels of a stored memory entry
    num_memory_frames: int = 5             # K: frames kept in the FIFO bank
    # memory attention
    num_layers: int = 4
    num_heads: int = 1
    downsample_rate: int = 1               # attention inner width = hidden_size // downsample_rate
    mlp_dim: int = 2048
    rope_theta: float = 10000.0
    rope_on_memory_keys: bool = False      # X2SAM: no RoPE on memory keys; SAM2/transformers: True
    query_pos_scale: float = 0.1           # query input = feature + 0.1 * sine PE
    dropout: float = 0.1                   # residual / FFN dropout (training only)
    attention_dropout: float = 0.1         # dropout on attention weights (training only)
    layer_norm_eps: float = 1e-5
    attention_implementation: str | None = None  # x2sam_jax.layers.attention (None = automatic)
    attention_query_chunk: int = 0         # 0 = automatic
    # memory encoder
    feature_strides: tuple[int, ...] = (1, 2, 4)  # per scale: vision downsampler total stride
    mask_stride: int = 4                   # mask logits (mask_features resolution) -> memory map
    downsampler_kernel_size: int = 3
    downsampler_stride: int = 2
    downsampler_padding: int = 1
    fuser_num_layers: int = 2
    fuser_mlp_dim: int = 1024
    fuser_kernel_size: int = 7
    layer_scale_init: float = 1e-6
    use_mask_guidance: bool = True
    use_class_guidance: bool = True
    sigmoid_scale: float = 20.0
    sigmoid_bias: float = -10.0
    remat_policy: str = "none"             # remat policy of the memory-attention layer scan
    dtype: str = "float32"                 # compute dtype (the bank stores it; mask guide, RoPE: float32)
    param_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class X2SAMConfig:
    """The full model: Qwen3-VL (+LoRA) + SAM2 Hiera mask encoder + the X2SAM segmentor head.

    Token ids: ``seg_token_id``/``p_start_token_id``/``p_end_token_id`` are the added vocabulary
    tokens; ``region_token_id`` marks the 64 (num_points / pool_kernel) placeholder positions of
    each ``<region>`` (Qwen's ``<|vision_pad|>``, which no processor emits).
    """

    vlm: Qwen3VLConfig = Qwen3VLConfig()
    mask_encoder: HieraConfig = HieraConfig()
    pixel_decoder: PixelDecoderConfig = PixelDecoderConfig()
    mask_decoder: MaskDecoderConfig = MaskDecoderConfig()
    memory: MemoryConfig = MemoryConfig()
    projector: ProjectorConfig = ProjectorConfig()
    seg_token_id: int = 151669
    p_start_token_id: int = 151670
    p_end_token_id: int = 151671
    region_token_id: int = 151654
    scan_frames: bool = True               # lax.scan over frames (False: the reference Python loop)
    frame_remat_policy: str = "none"       # remat policy of the per-frame step

    def __post_init__(self):
        checks = [
            (self.projector.llm_hidden_size == self.vlm.text.hidden_size,
             "projector.llm_hidden_size must equal vlm.text.hidden_size"),
            (self.projector.decoder_hidden_size == self.mask_decoder.hidden_size,
             "projector.decoder_hidden_size must equal mask_decoder.hidden_size"),
            (self.projector.mask_encoder_channels == self.mask_encoder.embed_dim_per_stage[2],
             "projector.mask_encoder_channels must equal the stage-3 width mask_encoder.embed_dim_per_stage[2]"),
            (self.pixel_decoder.feature_channels == (self.mask_encoder.fpn_hidden_size,) * 3,
             "pixel_decoder.feature_channels must be three times mask_encoder.fpn_hidden_size"),
            (self.memory.hidden_size == self.pixel_decoder.hidden_size == self.mask_decoder.level_feature_size,
             "memory and pixel decoder widths must equal the mask decoder's feature_size (or hidden_size)"),
            (self.pixel_decoder.mask_feature_size == self.mask_decoder.mask_feature_size,
             "pixel_decoder.mask_feature_size must equal mask_decoder.mask_feature_size"),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ValueError("X2SAMConfig: " + "; ".join(bad))

    @property
    def region_tokens(self) -> int:
        return self.projector.region_num_points // self.projector.region_pool_kernel


def x2sam_preset(name: str, **overrides) -> X2SAMConfig:
    """``x2sam_4b`` (the released x2sam_qwen3_vl_4b_sam2.1_hiera_large checkpoint) or ``tiny``."""
    if name == "x2sam_4b":
        # The official code appends <SEG>, <p>, </p> to the 151669-token Qwen3-VL tokenizer and
        # resizes the embedding to len(tokenizer) = 151672 rows; positions are plain 1-D.
        # Training defaults (they change no parameter; inference ignores remat): stacks scanned;
        # the video step recomputes a frame in the backward pass, so a clip keeps one frame's
        # activations; inside a frame the 86k-token deformable encoder, the memory attention over
        # 256x256 maps and the trained Hiera-L recompute everything; the LLM keeps q/k/v and the
        # attention output (MLP recomputed); the frozen ViT is never differentiated. Attention
        # everywhere is chosen by platform (cuDNN / splash / chunked XLA).
        # benchmarks/bench_qwen3_vl.py --memory-4b measures the LLM's policies.
        config = X2SAMConfig(
            vlm=Qwen3VLConfig(vision=Qwen3VLVisionConfig.preset("4b"),
                              text=Qwen3TextConfig.qwen3_vl_4b(vocab_size=151672, remat_policy="save_attention"),
                              lora=LoRAConfig(), position_mode="sequential"),
            mask_encoder=hiera_preset("large", scan_layers=True, remat_policy="full"),
            pixel_decoder=PixelDecoderConfig(remat_policy="full"),
            mask_decoder=MaskDecoderConfig(remat_policy="save_attention"),
            memory=MemoryConfig(num_memory_frames=5, remat_policy="full"),
            frame_remat_policy="full")
    elif name == "tiny":
        vision = Qwen3VLVisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=64,
                                     out_hidden_size=64, num_position_embeddings=64,
                                     deepstack_visual_indexes=(0, 1))
        text = Qwen3TextConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=16, mrope_section=(2, 3, 3),
                               rope_theta=10000.0, tie_word_embeddings=True)
        hiera = HieraConfig(hidden_size=16, num_attention_heads=1, blocks_per_stage=(1, 1, 2, 1),
                            embed_dim_per_stage=(16, 32, 64, 128), num_attention_heads_per_stage=(1, 1, 2, 2),
                            window_size_per_stage=(4, 4, 4, 4), global_attention_blocks=(3,),
                            window_positional_embedding_background_size=(4, 4), fpn_hidden_size=32,
                            image_size=128)
        config = X2SAMConfig(
            vlm=Qwen3VLConfig(vision=vision, text=text, lora=LoRAConfig(rank=4, alpha=8.0, dropout=0.0),
                              position_mode="sequential"),
            mask_encoder=hiera,
            pixel_decoder=PixelDecoderConfig(feature_channels=(32, 32, 32), hidden_size=32, mask_feature_size=32,
                                             num_layers=2, num_heads=4, num_points=2, ffn_dim=64, num_groups=8),
            mask_decoder=MaskDecoderConfig(hidden_size=32, num_queries=8, num_layers=3, num_heads=4, ffn_dim=64,
                                           mask_feature_size=32),
            memory=MemoryConfig(hidden_size=32, memory_dim=32, num_memory_frames=2, num_layers=1, mlp_dim=64,
                                fuser_mlp_dim=64, dropout=0.0, attention_dropout=0.0),
            projector=ProjectorConfig(llm_hidden_size=64, decoder_hidden_size=32, mask_encoder_channels=64,
                                      region_num_points=16, region_pool_kernel=4))
    else:
        raise ValueError(f"unknown X2SAM preset {name!r}; choose 'x2sam_4b' or 'tiny'")
    return dataclasses.replace(config, **overrides) if overrides else config


def with_compute_dtype(config, dtype: str):
    """``config`` (any nested config dataclass) with every ``dtype`` field, the compute dtype of
    each module, set to ``dtype``; storage (``param_dtype``) is left alone, so trainable
    parameters stay float32 master weights."""
    return _with_everywhere(config, ("dtype",), str(dtype))


def with_remat_policy(config, policy: str):
    """``config`` (any nested config dataclass) with every ``remat_policy`` and
    ``frame_remat_policy`` field set to ``policy`` (x2sam_jax.layers.scan.remat_policy)."""
    return _with_everywhere(config, ("remat_policy", "frame_remat_policy"), policy)


def _with_everywhere(config, names: tuple[str, ...], value):
    """``config`` with every field called one of ``names``, in it and its nested configs, set to ``value``."""
    changes = {}
    for field in dataclasses.fields(config):
        current = getattr(config, field.name)
        if dataclasses.is_dataclass(current):
            changes[field.name] = _with_everywhere(current, names, value)
        elif field.name in names:
            changes[field.name] = value
    return dataclasses.replace(config, **changes)
