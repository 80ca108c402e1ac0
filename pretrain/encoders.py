"""The image encoder (any timm model) and the BERT text encoder (the first `text_layers` BERT layers).

The image side is timm's model as it is (no fork): `build_vision_encoder` creates it headless, and
`vision_tokens` turns `forward_features` into one layout for every family: [CLS] first, then the patch tokens
in row-major grid order ([B, 1+N, D]). Models without a class token (Swin, ConvNets) get the mean of their
patch tokens as [CLS], as X-VLM does for Swin. The text side keeps BertModel's parameter names, so
`BertModel.from_pretrained(dir).state_dict()` loads into it after stripping `encoder.`.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from collections.abc import Mapping

import timm
import torch
from torch import Tensor, nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEmbeddings

from .bert_blocks import BertBlock, init_bert_weights, run_layers
from .config import ConfigError, TextConfig, VisionConfig


# ----------------------------------------------------------------------------------------------
# Image encoder
# ----------------------------------------------------------------------------------------------
def build_vision_encoder(cfg: VisionConfig, *, grad_checkpointing: bool = False) -> nn.Module:
    """timm model `cfg.name` at `cfg.img_size`, headless (tokens out); weights from `cfg.checkpoint` when set."""
    try:
        model = timm.create_model(cfg.name, pretrained=False, img_size=cfg.img_size, num_classes=0,
                                  global_pool="", drop_path_rate=cfg.drop_path_rate, **cfg.timm_kwargs)
    except RuntimeError as e:       # timm: "Unknown model (...)"
        raise ConfigError(f"model.vision.name: {e}") from None
    except TypeError as e:          # a timm_kwargs entry the model does not take
        raise ConfigError(f"model.vision.timm_kwargs: {e}") from None
    if cfg.conv_stem and cfg.cnn_trunk:
        raise ConfigError("model.vision: conv_stem and cnn_trunk are two stems; set one")
    if cfg.conv_stem:
        add_conv_stem(model, cfg.conv_stem, cfg.img_size, keep_patchify=cfg.conv_stem_add, depth=cfg.conv_stem_depth)
    elif cfg.cnn_trunk:
        add_cnn_trunk(model, cfg.cnn_trunk, cfg.img_size, keep_patchify=cfg.conv_stem_add)
    elif cfg.conv_stem_add:
        raise ConfigError("model.vision.conv_stem_add needs model.vision.conv_stem or cnn_trunk (the stem to add)")
    if cfg.checkpoint:
        load_vision_weights(model, cfg.checkpoint)
    elif cfg.pos_embed_init == "sincos":
        init_sincos_pos_embed(model)
    elif cfg.pos_embed_init != "random":
        raise ConfigError(f"model.vision.pos_embed_init: expected random or sincos, got {cfg.pos_embed_init!r}")
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


class SummedEmbed(nn.Module):
    """The patchify layer's tokens plus a convolutional stem's, on the same grid (`model.vision.conv_stem_add`).

    A linear patch embedding reads an object's colour directly (a linear function of its pixels) but not its
    shape when the object spans one or two patches at an arbitrary offset; a conv stem reads shapes but, on the
    synthetic scenes, loses part of the colour (linear probes on the tokens of an object after 800 demo
    fine-tuning steps, 2-core CPU: patchify colour 0.99 / shape 0.34 on held-out objects, conv stem 0.81 / 0.52,
    chance 0.17 / 0.20). The sum keeps both paths. Grid, patch size and position embeddings are the patchify's."""

    def __init__(self, patchify: nn.Module, stem: nn.Module) -> None:
        super().__init__()
        self.patchify = patchify
        self.stem = stem
        self.img_size, self.patch_size = patchify.img_size, patchify.patch_size
        self.grid_size, self.num_patches = patchify.grid_size, patchify.num_patches

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return self.patchify.dynamic_feat_size(img_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.patchify(x) + self.stem(x)


def add_conv_stem(model: nn.Module, widths: list, img_size: int, keep_patchify: bool = False, depth: int = 1) -> None:
    """Replace a ViT's patchify layer with a convolutional stem (Xiao et al., "Early Convolutions Help
    Transformers See Better", 2021): one 3x3 stride-2 conv per entry of `widths` (BatchNorm + ReLU between them;
    the last one linear and `embed_dim` wide), so len(widths) convs reach the patch stride (16 = four convs).
    Built from timm's own ConvStem and HybridEmbed; blocks, position embeddings and token grid are unchanged.
    `keep_patchify`: add the stem's tokens to the patchify layer's instead (SummedEmbed). `depth` > 1: that many
    3x3 convs per width, the first stride 2 and the others stride 1 (a deeper stem, larger receptive field)."""
    from timm.layers import HybridEmbed
    from timm.models.vision_transformer_hybrid import ConvStem

    if not isinstance(widths, list) or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0
                                               for w in widths):
        raise ConfigError(f"model.vision.conv_stem: expected a list of positive channel widths, got {widths!r}")
    embed = getattr(model, "patch_embed", None)
    if embed is None or not hasattr(embed, "patch_size"):
        raise ConfigError(f"model.vision.conv_stem: {type(model).__name__} has no ViT patch embedding")
    patch, dim = int(embed.patch_size[0]), int(model.embed_dim)
    if 2 ** len(widths) != patch:
        raise ConfigError(f"model.vision.conv_stem: {len(widths)} stride-2 convs reach stride {2 ** len(widths)}, "
                          f"not the model's patch size {patch}")
    if widths[-1] != dim:
        raise ConfigError(f"model.vision.conv_stem: the last width {widths[-1]} must be the embed_dim {dim}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ConfigError(f"model.vision.conv_stem_depth: expected an integer >= 1, got {depth!r}")
    channels = tuple(w for w in widths for _ in range(depth))
    strides = tuple(2 if i % depth == 0 else 1 for i in range(len(channels)))
    stem = ConvStem(depth=len(channels), channels=channels, kernel_size=3, stride=strides, padding=1)
    hybrid = HybridEmbed(stem, img_size=img_size, patch_size=1, embed_dim=dim, proj=False)
    model.patch_embed = SummedEmbed(embed, hybrid) if keep_patchify else hybrid


def conv_stem_maps(model: nn.Module) -> dict[int, tuple[nn.Module, int]]:
    """{stride: (layer, channels)} of a ViT's conv stem (model.vision.conv_stem, added to the patchify layer or in
    its place): for each stride the stem reaches before the patch stride, its last layer at that stride (after
    BatchNorm + ReLU) and that layer's width. {} without a conv stem."""
    from timm.models.vision_transformer_hybrid import ConvStem

    embed = getattr(model, "patch_embed", None)
    hybrid = embed.stem if isinstance(embed, SummedEmbed) else embed
    stem = getattr(hybrid, "backbone", None)
    if not isinstance(stem, ConvStem):
        return {}
    maps, stride = {}, 1
    for layer in list(stem)[:-1]:                       # the last conv is the linear patch-stride projection
        stride *= int(layer.conv.stride[0])
        maps[stride] = (layer, int(layer.conv.out_channels))
    return maps


def add_cnn_trunk(model: nn.Module, name: str, img_size: int, keep_patchify: bool = False) -> None:
    """The ViT paper's hybrid (Dosovitskiy et al. 2021, 3.1): the patch embedding reads a CNN's feature map at
    the ViT's patch stride instead of pixels; `name` is any timm CNN with features_only (resnet18 stops after
    its stride-16 stage for a /16 ViT), randomly initialised, and a 1x1 projection (timm's HybridEmbed) brings
    it to embed_dim. Blocks, position embeddings and token grid are unchanged. `keep_patchify`: add its tokens
    to the patchify layer's (SummedEmbed), as conv_stem_add does."""
    from timm.layers import HybridEmbed

    embed = getattr(model, "patch_embed", None)
    if embed is None or not hasattr(embed, "patch_size"):
        raise ConfigError(f"model.vision.cnn_trunk: {type(model).__name__} has no ViT patch embedding")
    patch, dim = int(embed.patch_size[0]), int(model.embed_dim)
    trunk = build_cnn_trunk(name, patch, "model.vision.cnn_trunk", "the model's patch size")
    hybrid = HybridEmbed(trunk, img_size=img_size, patch_size=1, embed_dim=dim)
    model.patch_embed = SummedEmbed(embed, hybrid) if keep_patchify else hybrid


def build_cnn_trunk(name: str, stride: int, what: str = "cnn", wanted: str = "the stride wanted") -> nn.Module:
    """timm CNN `name` (random init, features_only) cut after its stage at `stride`: one feature map out. `what`
    and `wanted` name the setting and the stride in the ConfigError for an unknown model or a missing stride."""
    try:
        probe = timm.create_model(name, pretrained=False, features_only=True)
    except RuntimeError as e:       # timm: "Unknown model (...)" or a model without features_only
        raise ConfigError(f"{what}: {e}") from None
    strides = probe.feature_info.reduction()
    if stride not in strides:
        raise ConfigError(f"{what}: {name}'s feature maps have strides {strides}, none is {wanted} {stride}")
    return timm.create_model(name, pretrained=False, features_only=True, out_indices=(strides.index(stride),))


def init_sincos_pos_embed(model: nn.Module) -> None:
    """Set a ViT's absolute position embeddings to MAE's fixed 2D sin-cos table (prefix tokens zero); they stay
    trainable. A randomly initialised table (std 0.02) tells the patches nothing about where they are until it is
    learnt; a small model trained briefly never learns it well (finetune/heads.py)."""
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

    pos = getattr(model, "pos_embed", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if pos is None or grid is None:
        raise ConfigError(f"model.vision.pos_embed_init=sincos: {type(model).__name__} has no absolute position embedding")
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 0))
    table = build_sincos2d_pos_embed(list(grid), dim=pos.shape[-1])     # rows of the grid, row-major like the tokens
    with torch.no_grad():
        pos.zero_()
        pos[0, prefix:] = table.to(pos.dtype)


def _read_state_dict(path: str | Path) -> dict[str, Tensor]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: vision checkpoint not found")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user mistake
        raise ConfigError(f"{p}: cannot read vision checkpoint ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model", "module"):   # common wrappers (timm train script, DeepSpeed, MAE)
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping):
        raise ConfigError(f"{p}: not a state dict")
    return dict(sd)


def load_vision_weights(model: nn.Module, path_or_state_dict: str | Path | Mapping[str, Tensor]) -> None:
    """Load a timm / safetensors state dict into `model`, resampling position embeddings to its grid.

    The model family's own timm `checkpoint_filter_fn` does the adaptation (ViT: pos-embed and patch-embed
    resampling, original/OpenAI-CLIP layouts; Swin: relative-position tables). Classifier heads are dropped.
    Anything else that does not fit raises ConfigError naming the keys.
    """
    if isinstance(path_or_state_dict, (str, Path)):
        sd, where = _read_state_dict(path_or_state_dict), str(path_or_state_dict)
    else:
        sd, where = dict(path_or_state_dict), "state dict"
    sd = {k.removeprefix("vision."): v for k, v in sd.items()}
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        sd = filter_fn(sd, model)
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if not (k.startswith(("head.", "fc_norm.")) and k not in own)}
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
           if k in own and v.shape != own[k].shape]
    if bad:
        raise ConfigError(f"{where}: shapes do not fit {type(model).__name__}: {', '.join(bad[:3])}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{where}: does not fit {type(model).__name__}: missing {missing[:3]}"
                          f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                          f"{'...' if len(unexpected) > 3 else ''}")


def vision_tokens(model: nn.Module, images: Tensor) -> Tensor:
    """[B, 3, S, S] -> [B, 1+N, D]: [CLS] then the N patch tokens in row-major order (registers dropped)."""
    out = model.forward_features(images)
    if out.ndim == 4:   # feature map: NHWC (Swin, timm >= 0.9) or NCHW (ConvNets)
        if getattr(model, "output_fmt", "NCHW") != "NHWC":
            out = out.permute(0, 2, 3, 1)
        patches = out.flatten(1, 2)
        cls = patches.mean(dim=1, keepdim=True)
    else:
        prefix = getattr(model, "num_prefix_tokens", 0)
        patches = out[:, prefix:]
        if getattr(model, "has_class_token", False):
            cls = out[:, :1]
        else:
            cls = patches.mean(dim=1, keepdim=True)
    return torch.cat([cls, patches], dim=1)


def token_grid(num_patches: int) -> tuple[int, int]:
    """(rows, cols) of a square patch grid with `num_patches` tokens (images are square here)."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patch tokens do not form a square grid")
    return side, side


# ----------------------------------------------------------------------------------------------
# Text encoder
# ----------------------------------------------------------------------------------------------
def build_bert_config(cfg: TextConfig, vocab_size: int | None = None) -> BertConfig:
    """BertConfig from the checkpoint dir `cfg.bert` when set, else from the size fields of `cfg`."""
    if cfg.bert:
        if not (Path(cfg.bert) / "config.json").is_file():
            raise ConfigError(f"model.text.bert: {cfg.bert} is not a BERT checkpoint dir (no config.json)")
        config = BertConfig.from_pretrained(cfg.bert)
    else:
        config = BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                            intermediate_size=cfg.intermediate_size,
                            max_position_embeddings=max(512, cfg.max_len))
    if vocab_size is not None:
        config.vocab_size = vocab_size
    if not 0 < cfg.text_layers < config.num_hidden_layers:
        raise ConfigError(f"model.text.text_layers={cfg.text_layers} must leave text and fusion layers out of "
                          f"the BERT's {config.num_hidden_layers} layers")
    if cfg.max_len > config.max_position_embeddings:
        raise ConfigError(f"model.text.max_len={cfg.max_len} exceeds the BERT's "
                          f"{config.max_position_embeddings} positions")
    return config


def read_bert_state_dict(bert_dir: str | Path) -> dict[str, Tensor]:
    """The weights of a local BERT checkpoint dir as BertModel keys (`embeddings.*`, `encoder.layer.*`), plus
    the MLM head's `cls.predictions.{transform.*, bias}` when the checkpoint has them (BertForMaskedLM /
    BertForPreTraining layouts; a bare BertModel has none)."""
    from transformers import BertForMaskedLM
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()        # a bare BertModel dir lacks the head: expected, not worth a table
    try:
        model, info = BertForMaskedLM.from_pretrained(str(bert_dir), output_loading_info=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.text.bert: cannot load {bert_dir} ({str(e).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = set(info["missing_keys"])
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("bert."):
            sd[k[len("bert."):]] = v
        elif k.startswith("cls.predictions.") and ".decoder." not in k and k not in missing:
            sd[k] = v
    return sd


def load_bert_layers(module: nn.Module, sd: Mapping[str, Tensor], first_layer: int,
                     new_prefixes: tuple[str, ...] = (), with_embeddings: bool = False) -> None:
    """Copy BertModel weights `encoder.layer.{first_layer + i}` into `module.layer.{i}` (and embeddings).

    Keys under `new_prefixes` (e.g. cross-attention) are expected to be missing; anything else missing is an
    error. A word-embedding table of another vocabulary size is copied over the rows both share.
    """
    own = module.state_dict()
    mapped: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.startswith("encoder.layer."):
            idx, rest = k[len("encoder.layer."):].split(".", 1)
            j = int(idx) - first_layer
            name = f"layer.{j}.{rest}"
            if name in own:
                mapped[name] = v
        elif with_embeddings and k.startswith("embeddings.") and k in own:
            mapped[k] = v
    word = "embeddings.word_embeddings.weight"
    if word in mapped and mapped[word].shape != own[word].shape:
        table = own[word].clone()
        n = min(table.shape[0], mapped[word].shape[0])
        table[:n] = mapped[word][:n]
        mapped[word] = table
    missing = [k for k in own if k not in mapped and not any(p in k for p in new_prefixes)]
    if missing:
        raise ConfigError(f"model.text.bert: checkpoint lacks {missing[:3]} for {type(module).__name__}")
    module.load_state_dict(mapped, strict=False)


class TextEncoder(nn.Module):
    """BERT embeddings + layers [0, text_layers), bidirectional with a padding mask -> [B, L, d]."""

    def __init__(self, config: BertConfig, num_layers: int):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layer = nn.ModuleList(BertBlock(config) for _ in range(num_layers))
        self.grad_checkpointing = False
        init_bert_weights(self, config.initializer_range)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        x = self.embeddings(input_ids=input_ids)
        return run_layers(self.layer, x, self.grad_checkpointing, attention_mask)


def build_text_encoder(cfg: TextConfig, vocab_size: int | None = None, *,
                       bert_state_dict: Mapping[str, Tensor] | None = None) -> TextEncoder:
    """TextEncoder of `cfg.text_layers` layers; weights from `cfg.bert` (its first layers) when set.

    `bert_state_dict` lets a caller that also builds the fusion encoder read the checkpoint once.
    """
    config = build_bert_config(cfg, vocab_size)
    enc = TextEncoder(config, cfg.text_layers)
    if cfg.bert:
        sd = bert_state_dict if bert_state_dict is not None else read_bert_state_dict(cfg.bert)
        load_bert_layers(enc, sd, first_layer=0, with_embeddings=True)
    return enc
