"""Typed fine-tuning configuration (VG-LAW + Mask Grounding), built from pretrain.config's section types.

    cfg = load_config(FinetuneConfig, "configs/finetune/refcoco.yaml", ["optim.lr=2e-4"])

Defaults follow the VG-LAW paper (lr 4e-4, backbones x0.1 = 4e-5, weight decay 1e-4, lr x0.1 at two
milestones, loss weights 1/1/4/4) and the authors' MindSpore port (G=12, r=16, d_w=32, window 14, global
blocks 2/5/8/11, LAP k=64, threshold 0.35). Schedules are in optimizer steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pretrain.config import (ConfigError, check_min, EngineConfig, OptimConfig, RunConfig, TextConfig, VisionConfig,
                             load_config, save_config)

__all__ = ["FinetuneConfig", "FinetuneOptimConfig", "FinetuneRunConfig", "GroundingModelConfig", "MaskGroundingConfig",
           "MdetrHeadConfig", "GroundingLossConfig",
           "GroundingDataConfig", "EvalConfig", "load_config", "save_config", "ConfigError"]


def _vision_448() -> VisionConfig:
    return VisionConfig(name="vit_base_patch16_224", img_size=448)


@dataclass
class MaskGroundingConfig:
    enabled: bool = True
    mask_ratio: float = 0.25                # fraction of the expression's word tokens replaced by [MASK]
    depth: int = 2                          # layers of the masked-token predictor
    heads: int = 8
    dim: int = 256                          # predictor width
    use_box: bool = False                   # mask embedding from (centre, box) instead of MagNet's centre alone
    reuse_visual: bool = False              # True: predictor sees the main pass's visual tokens (cheaper, but
                                            # LAW conditioned them on the unmasked words, which can leak them)
    batch_fraction: float = 1.0             # the second (masked-text) pass on this leading fraction of the batch
                                            # (at least one sample): the loss is an unbiased subsample, the cost
                                            # of the extra backbone pass scales with it

    def validate(self) -> None:
        if not 0.0 < self.batch_fraction <= 1.0:
            raise ConfigError(f"model.mask_grounding.batch_fraction must be in (0, 1], got {self.batch_fraction}")
        if not 0.0 < self.mask_ratio <= 1.0:
            raise ConfigError(f"model.mask_grounding.mask_ratio must be in (0, 1], got {self.mask_ratio}")
        if self.depth < 1 or self.dim % self.heads:
            raise ConfigError("model.mask_grounding: depth >= 1 and dim divisible by heads required")


MDETR_BOXES = ("mlp", "geometry")      # how the mdetr head reads a query's box (finetune/mdetr_head.py)
INIT_PARTS = ("vision", "text")         # the encoders init_from can initialise (finetune/checkpoint.load_pretrained)


@dataclass
class MdetrHeadConfig:
    """The MDETR-style multi-instance head (model.head: mdetr, finetune/mdetr_head.py)."""
    queries: int = 10                       # object queries = the most targets one expression can get
    dim: int = 256                          # decoder width
    depth: int = 3                          # decoder layers
    heads: int = 8
    align_dim: int = 64                     # contrastive alignment space (MDETR: 64)
    score_threshold: float = 0.5            # a query answers when 1 - p(no object) reaches this
    box: str = "mlp"                        # mlp: sigmoid(MLP(query)) (MDETR); geometry: each query's attention
                                            # map's reference box + an MLP correction (finetune/mdetr_head.py)
    select: bool = False                    # query selection: the Q visual tokens that best match the expression
                                            # start the Q queries (two-stage DETR / DINO; loss.select trains it)

    def validate(self) -> None:
        if self.box not in MDETR_BOXES:
            raise ConfigError(f"model.mdetr.box: expected one of {', '.join(MDETR_BOXES)}, got {self.box!r}")
        if self.queries < 1 or self.depth < 1 or self.align_dim < 1 or self.heads < 1 or self.dim % self.heads:
            raise ConfigError("model.mdetr: queries, depth, align_dim >= 1 and dim divisible by heads required")
        if not 0.0 < self.score_threshold < 1.0:
            raise ConfigError(f"model.mdetr.score_threshold must be in (0, 1), got {self.score_threshold}")


HEADS = ("vglaw", "mdetr")


@dataclass
class GroundingModelConfig:
    vision: VisionConfig = field(default_factory=_vision_448)   # img_size = fine-tuning resolution
    text: TextConfig = field(default_factory=TextConfig)
    window_size: int = 14                   # ViTDet windowed attention; 0 = all blocks global
    global_blocks: list = field(default_factory=lambda: [2, 5, 8, 11])
    law: bool = True                        # False = static backbone weights (ablation / benchmark)
    law_groups: int = 12
    law_reduction: int = 16
    law_rank: int = 32                      # d_w
    law_init_std: float = 0.0               # std of Phi's generator weight at init; 0 = zeros (the MindSpore port)
    lap_dim: int = 64
    lap_geometry: bool = False              # box = LAP map's reference box + MLP correction (finetune/heads.py)
    rec_detach: bool = False                # the box head reads the backbone's features without training them
    text_pool: str = "cls"                  # the expression vector the heads read: cls (VG-LAW) | mean (of the tokens)
    head_hidden: int = 256
    res_hidden: int = 256
    res_skip: bool = False                  # the mask head also reads the conv stem's stride-8/4 maps (finetune/heads.py)
    mask_threshold: float = 0.35
    mask_grounding: MaskGroundingConfig = field(default_factory=MaskGroundingConfig)
    attn_layers: list = field(default_factory=list)   # ViT blocks whose tokens get their own LAP map, constrained
                                            # by loss.rac / loss.mrc beside the head's (AttBalance's per-layer maps)
    cam: bool = False                       # MagNet's cross-modal alignment module after the backbone (finetune/cam.py)
    cam_pools: list = field(default_factory=lambda: [1, 2, 4])   # CAM's pooling windows (token-grid cells)
    cam_heads: int = 4                      # heads of CAM's two cross-attentions
    head: str = "vglaw"                     # vglaw: one box + one mask; mdetr: N object queries (several or none)
    mdetr: MdetrHeadConfig = field(default_factory=MdetrHeadConfig)

    def validate(self) -> None:
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in self.attn_layers):
            raise ConfigError(f"model.attn_layers: expected ViT block indices (integers >= 0), got {self.attn_layers}")
        if len(set(self.attn_layers)) != len(self.attn_layers):
            raise ConfigError(f"model.attn_layers: repeated block index in {self.attn_layers}")
        if not self.cam_pools or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in self.cam_pools):
            raise ConfigError(f"model.cam_pools: expected a non-empty list of integers >= 1, got {self.cam_pools}")
        check_min("model", self, {"cam_heads": 1})
        if self.law_init_std < 0:
            raise ConfigError(f"model.law_init_std: must be >= 0, got {self.law_init_std}")
        if self.text_pool not in ("cls", "mean"):
            raise ConfigError(f"model.text_pool: expected cls or mean, got {self.text_pool!r}")
        if self.head not in HEADS:
            raise ConfigError(f"model.head: expected one of {', '.join(HEADS)}, got {self.head!r}")


@dataclass
class GroundingLossConfig:
    l1: float = 1.0
    giou: float = 1.0
    focal: float = 4.0
    dice: float = 4.0
    mask_grounding: float = 1.0
    rac: float = 0.0                        # AttBalance's region attention constraint on the LAP map (0: off)
    mrc: float = 0.0                        # AttBalance's momentum constraint KL(A_momentum || A) (0: off)
    mrc_momentum: float = 0.999             # EMA coefficient of the momentum model (per optimizer step)
    dat: bool = False                       # AttBalance's difficulty adaptive weights on the box losses
    cal: float = 0.0                        # MagNet's cross-modal alignment loss, lambda_CAL (0: off); with the
                                            # mdetr head on the union mask of the targets, no-target samples left out
    cal_tau_pixel: float = 0.07             # tau_1 of the pixel-to-pixel InfoNCE
    cal_tau_text: float = 0.07              # tau_2 of the pixel-to-text InfoNCE
    cal_pixels: int = 512                   # pixels drawn per class (object / background) and sample; 0 = all
    context: float = 0.0                    # the mask (focal + dice) and box (L1 + GIoU) losses, at the weights above,
                                            # of the image's other objects, each from its own expression on the
                                            # item's backbone pass (finetune/context_loss.py; needs
                                            # data.context_refs; 0: off)
    context_box: bool = True                # loss.context also scores the LAP head's box for each of them (L1 + GIoU)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # model.head: mdetr only (finetune/mdetr_losses.py): l1/giou/focal/dice above weight the matched queries
    token: float = 1.0                      # soft token prediction cross-entropy
    align: float = 1.0                      # contrastive alignment (both directions)
    align_temperature: float = 0.07
    no_object: float = 0.1                  # weight of "no object" targets in the token loss (DETR's eos_coef)
    select: float = 1.0                     # model.mdetr.select: BCE of the token scores against the targets' cover
    cost_token: float = 1.0                 # Hungarian matching costs (MDETR: 1, 5, 2)
    cost_l1: float = 5.0
    cost_giou: float = 2.0

    def validate(self) -> None:
        check_min("loss", self, {"l1": 0.0, "giou": 0.0, "focal": 0.0, "dice": 0.0, "mask_grounding": 0.0,
                                 "rac": 0.0, "mrc": 0.0, "cal": 0.0, "context": 0.0, "cal_pixels": 0, "token": 0.0,
                                 "align": 0.0, "no_object": 0.0, "select": 0.0, "cost_token": 0.0, "cost_l1": 0.0,
                                 "cost_giou": 0.0})
        if not self.align_temperature > 0:
            raise ConfigError(f"loss.align_temperature must be > 0, got {self.align_temperature}")
        if not 0.0 <= self.mrc_momentum < 1.0:
            raise ConfigError(f"loss.mrc_momentum must be in [0, 1), got {self.mrc_momentum}")
        for key in ("cal_tau_pixel", "cal_tau_text"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"loss.{key} must be > 0, got {getattr(self, key)}")


@dataclass
class GroundingDataConfig:
    shards: str = "runs/demo/shards/refcoco"    # dataset dir holding <split>/shard-*.tar + manifest.json
    train_split: str = "train"
    image_size: int = 448
    max_len: int = 40
    batch_size: int = 32                    # per GPU
    num_workers: int = 4
    batches_per_epoch: int = 0              # 0 = one pass over the train split per epoch (per rank)
    paired: bool = False                    # batches of expression pairs: one image, two different targets
    context_refs: int = 0                   # up to this many other objects of the image, one expression each, come
                                            # with a training item (shards/context.py; for loss.context)
    context_per_object: int = 1             # up to this many distinct expressions of each of those objects

    def validate(self) -> None:
        check_min("data", self, {"image_size": 16, "max_len": 3, "batch_size": 1, "num_workers": 0,
                                 "batches_per_epoch": 0, "context_refs": 0, "context_per_object": 1})
        if self.paired and self.batch_size % 2:
            raise ConfigError(f"data.paired needs an even data.batch_size (pairs must not straddle batches), "
                              f"got {self.batch_size}")


@dataclass
class EvalConfig:
    splits: list = field(default_factory=lambda: ["val"])   # evaluated at the end (and every run.eval_every steps)
    batch_size: int = 32
    dump: bool = False                      # per-expression predictions: <out_dir>/eval/<split>.jsonl (final),
                                            # eval/step<N>/<split>.jsonl (run.eval_every evaluations)

    def validate(self) -> None:
        check_min("eval", self, {"batch_size": 1})


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """OptimConfig with VG-LAW's defaults (a YAML `optim:` section starts from these, not pretraining's)."""
    lr: float = 4e-4
    weight_decay: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    total_steps: int = 90_000
    schedule: str = "step"
    step_milestones: list = field(default_factory=lambda: [10_000, 60_000])
    head_lr_mult: float = 1.0


@dataclass
class FinetuneRunConfig(RunConfig):
    out_dir: str = "runs/finetune"


@dataclass
class FinetuneConfig:
    init_from: Optional[str] = None         # pretraining out_dir / export dir / .safetensors / DeepSpeed dir; null = scratch
    init_parts: list = field(default_factory=lambda: list(INIT_PARTS))   # what init_from loads: vision, text or both
    init_shrink: float = 1.0                # < 1: keep this fraction of each loaded tensor, the rest from the fresh init
    backbone_lr_mult: float = 0.1           # ViT and text encoder: lr x this (paper: 4e-5 vs 4e-4)
    law_lr_mult: float = 1.0                # the language adaptive weight generator: lr x this (paper: 1)
    model: GroundingModelConfig = field(default_factory=GroundingModelConfig)
    loss: GroundingLossConfig = field(default_factory=GroundingLossConfig)
    data: GroundingDataConfig = field(default_factory=GroundingDataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    run: FinetuneRunConfig = field(default_factory=FinetuneRunConfig)

    def validate(self) -> None:
        # one resolution everywhere: the ViT's grid (and its resampled position embeddings) is built for it
        self.model.vision.img_size = self.data.image_size
        text_dim = self.model.text.hidden_size if not self.model.text.bert else None
        if text_dim is not None and text_dim % self.model.law_groups:
            raise ConfigError(f"model.law_groups={self.model.law_groups} must divide the text width {text_dim}")
        if self.model.head == "mdetr":
            for key, on in (("loss.rac", self.loss.rac > 0), ("loss.mrc", self.loss.mrc > 0), ("loss.dat", self.loss.dat),
                            ("model.attn_layers", bool(self.model.attn_layers))):
                if on:
                    raise ConfigError(f"{key} needs the one-instance head's LAP map, box and mask (model.head: "
                                      f"vglaw); the mdetr head has none of them")
        if (self.loss.context > 0) != (self.data.context_refs > 0):
            raise ConfigError(f"loss.context={self.loss.context} and data.context_refs={self.data.context_refs}: "
                              "set both (the loss reads the other objects the data loads) or neither")
        if self.data.context_per_object > 1 and not self.data.context_refs:
            raise ConfigError(f"data.context_per_object={self.data.context_per_object} needs data.context_refs > 0 "
                              "(the objects whose expressions it counts)")
        if self.loss.context > 0 and self.model.head != "vglaw":
            raise ConfigError("loss.context needs the one-instance head's mask and box (model.head: vglaw); with "
                              "model.head=mdetr add loss.context=0 data.context_refs=0")
        parts = self.init_parts
        if (not isinstance(parts, list) or not parts or any(p not in INIT_PARTS for p in parts)
                or len(set(parts)) != len(parts)):
            raise ConfigError(f"init_parts: expected a non-empty list of distinct {list(INIT_PARTS)}, got {parts!r}")
        if not 0.0 < self.init_shrink <= 1.0:
            raise ConfigError(f"init_shrink must be in (0, 1] (the fraction of each pretrained tensor kept), got "
                              f"{self.init_shrink}")
        for key in ("backbone_lr_mult", "law_lr_mult"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
