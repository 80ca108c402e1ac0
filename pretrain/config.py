"""Typed run configuration: dataclasses loaded from YAML with dotted command-line overrides.

One config object describes a whole run (model, data, optimiser, engine, run bookkeeping). Both stages
use the same machinery: `pretrain` defines `PretrainConfig`, `finetune` defines its own top-level
dataclass from the same section types. Unknown keys and wrong types are rejected with a `ConfigError`
naming the dotted key, so the CLI can print one line instead of a traceback.

    cfg = load_config(PretrainConfig, "configs/pretrain/smoke.yaml", ["optim.lr=2e-4", "data.batch_size=64"])
    save_config(cfg, out_dir / "config.yaml")
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A user mistake in a config file or override (unknown key, wrong type, bad value)."""


SCHEDULES = ("linear", "cosine", "step", "constant")
PRECISIONS = ("bf16", "fp32", "fp16")


# ----------------------------------------------------------------------------------------------
# Sections shared by both stages
# ----------------------------------------------------------------------------------------------
@dataclass
class VisionConfig:
    name: str = "vit_base_patch16_224"      # any timm model name
    img_size: int = 224
    checkpoint: Optional[str] = None        # timm / safetensors state dict; random init when None
    drop_path_rate: float = 0.0
    timm_kwargs: dict = field(default_factory=dict)  # extra keyword arguments for timm.create_model
    pos_embed_init: str = "random"          # random (timm's) | sincos (MAE's 2D sin-cos, still learnt); no checkpoint only
    conv_stem: list = field(default_factory=list)  # [] = timm's patchify; widths of 3x3/2 convs instead (ViT_C)
    conv_stem_add: bool = False             # keep the patchify too and add the stem's tokens (encoders.SummedEmbed)
    conv_stem_depth: int = 1                # 3x3 convs per conv_stem width: one stride-2, the others stride 1
    cnn_trunk: str = ""                     # a timm CNN whose patch-stride features are the stem (hybrid ViT)


@dataclass
class TextConfig:
    bert: Optional[str] = None              # local BERT checkpoint dir (save_pretrained layout); random init when None
    tokenizer: Optional[str] = None         # local tokenizer dir; defaults to `bert`
    vocab_size: int = 30522                 # used only for random init (a checkpoint/tokenizer dir wins)
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    text_layers: int = 6                    # layers [0, text_layers) = text encoder, the rest = fusion
    max_len: int = 40


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    warmup_steps: int = 2500
    total_steps: int = 200_000
    schedule: str = "linear"                # linear | cosine | step | constant (after warm-up)
    step_milestones: list = field(default_factory=list)   # for schedule=step: steps where lr *= step_gamma
    step_gamma: float = 0.1
    min_lr_ratio: float = 0.0
    head_lr_mult: float = 2.0               # lr multiplier for newly initialised heads
    grad_clip: float = 1.0
    fused: bool = True                      # torch fused AdamW on CUDA

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule: expected one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.total_steps < 1:
            raise ConfigError(f"optim.total_steps: must be >= 1, got {self.total_steps}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {self.betas!r}")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: must be > 0, got {self.lr}")
        for name in ("weight_decay", "grad_clip", "min_lr_ratio", "head_lr_mult", "step_gamma"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name}: must be >= 0, got {getattr(self, name)}")
        if self.eps <= 0:
            raise ConfigError(f"optim.eps: must be > 0, got {self.eps}")
        if not all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in self.step_milestones):
            raise ConfigError(f"optim.step_milestones: expected positive step numbers, got {self.step_milestones!r}")


ENGINE_BACKENDS = ("deepspeed", "ddp")


@dataclass
class EngineConfig:
    backend: str = "deepspeed"              # deepspeed (ZeRO 0-3, offload) | ddp (torch DistributedDataParallel)
    deepspeed: bool = True                  # False = backend ddp (the PyTorch engine; one process is plain PyTorch)
    zero_stage: int = 2                     # 0-3 (backend deepspeed only)
    precision: str = "bf16"                 # bf16 | fp32 | fp16
    offload_optimizer: bool = False
    offload_params: bool = False
    grad_accum: int = 1
    activation_checkpointing: bool = False
    compile: bool = False                   # torch.compile the task module (pretrain/compile.py)
    compile_backend: str = "inductor"       # torch.compile backend (inductor; aot_eager traces without codegen)
    compile_dynamic: Optional[bool] = None  # None: dims that change get dynamic after one recompile; True/False: force
    global_batch_size: Optional[int] = None  # if set, grad_accum = global / (micro batch x world size), exactly

    @property
    def uses_deepspeed(self) -> bool:
        """True for the DeepSpeed engine; False for the PyTorch one (DDP over several processes)."""
        return self.deepspeed and self.backend == "deepspeed"

    def validate(self) -> None:
        if self.backend not in ENGINE_BACKENDS:
            raise ConfigError(f"engine.backend: expected one of {', '.join(ENGINE_BACKENDS)}, got {self.backend!r}")
        if not self.compile_backend:
            raise ConfigError("engine.compile_backend: must name a torch.compile backend (e.g. inductor)")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"engine.zero_stage: expected 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"engine.precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.grad_accum < 1:
            raise ConfigError(f"engine.grad_accum: must be >= 1, got {self.grad_accum}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ConfigError(f"engine.global_batch_size: must be >= 1, got {self.global_batch_size}")
        if (self.offload_optimizer or self.offload_params) and not self.uses_deepspeed:
            raise ConfigError("engine.offload_*: offloading needs engine.backend=deepspeed")
        if (self.offload_optimizer or self.offload_params) and self.zero_stage == 0:
            raise ConfigError("engine.offload_*: offloading needs engine.zero_stage >= 1")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("engine.offload_params: parameter offload needs engine.zero_stage=3")


@dataclass
class WandbConfig:
    mode: str = "offline"                   # offline | online | disabled
    project: str = "vlp-grounding"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: list = field(default_factory=list)
    init_timeout: float = 60.0              # seconds; wandb falls back to disabled when init takes longer

    def validate(self) -> None:
        if self.mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"run.wandb.mode: expected offline, online or disabled, got {self.mode!r}")


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 42
    log_every: int = 10
    save_every: int = 1000
    eval_every: int = 0                     # 0: evaluate only at the end (when the stage passes an evaluate fn)
    keep_checkpoints: int = 2
    resume: Optional[str] = "latest"        # latest | <checkpoint dir> | null
    export: bool = True                     # write consolidated safetensors at the end
    max_nan_steps: int = 5                  # stop after this many non-finite losses in a row
    requeue_exit_code: int = 85             # exit code after a preemption checkpoint (sbatch requeues on it; not 124, which GNU timeout uses)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> None:
        for name in ("log_every", "save_every", "keep_checkpoints", "max_nan_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"run.{name}: must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ConfigError(f"run.seed: must be >= 0, got {self.seed}")
        if not 0 < self.requeue_exit_code < 256:
            raise ConfigError(f"run.requeue_exit_code: must be in 1..255, got {self.requeue_exit_code}")


# ----------------------------------------------------------------------------------------------
# Generic machinery
# ----------------------------------------------------------------------------------------------
def check_min(section: str, obj: Any, minimums: dict[str, int]) -> None:
    """ConfigError naming `section.field` for the first numeric field below its minimum."""
    for name, lo in minimums.items():
        v = getattr(obj, name)
        if v is not None and v < lo:
            raise ConfigError(f"{section}.{name}: must be >= {lo}, got {v}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert `value` to the annotated type `tp`; raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        out = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):        # YAML reads 1e-4 (no dot) as a string
            try:
                out = float(value)
            except ValueError:
                pass
        if out is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(out):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp in (list, dict) or origin in (list, dict):
        base = origin or tp
        if isinstance(value, base):
            return value
        if base is list and isinstance(value, tuple):
            return list(value)
        raise ConfigError(f"{key}: expected a {base.__name__}, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (valid keys here: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse override value {text!r}: {e}") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (YAML-parsed values) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{key}': '{p}' is not a section")
            node = nxt
        node[parts[-1]] = _parse_scalar(text)
    return data


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{p}: unreadable ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: malformed YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return data


def load_config(cls: type, path: str | Path | None, overrides: list[str] | None = None) -> Any:
    """Defaults of `cls` <- YAML file <- dotted overrides, type-checked."""
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides or []))
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(p)


# ----------------------------------------------------------------------------------------------
# Pretraining (X-VLM) sections. The model helper owns ModelConfig/LossConfig fields, the loader owns
# PretrainDataConfig fields; add fields with defaults, never rename without updating configs/.
# ----------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256                    # ITC projection width
    temp: float = 0.07                      # initial ITC temperature (learnable, clamped)
    grad_checkpointing: bool = False        # activation checkpointing inside timm / BERT layers


@dataclass
class LossConfig:
    weights: dict = field(default_factory=lambda: {"itc": 1.0, "itm": 1.0, "mlm": 1.0, "bbox": 1.0, "giou": 1.0})
    region_weight: float = 1.0              # L = L_image + region_weight * L_region (X^2-VLM mixed batch)
    # identical texts in a batch (pretrain.losses.same_text) are neither ITC negatives nor ITM hard negatives of
    # each other (X-VLM counts them as negatives: false ones, frequent among short region captions)
    exclude_duplicates: bool = True


@dataclass
class SourceConfig:
    name: str = ""                          # coco | vg | cc3m | sbu | objects365 | ...
    shards: str = ""                        # shard directory (with manifest.json) or brace pattern
    weight: float = 1.0


@dataclass
class PretrainDataConfig:
    sources: list = field(default_factory=list)       # list of SourceConfig mappings
    batch_size: int = 64                    # image-text samples per GPU per micro-step
    region_texts: int = 128                 # region texts per GPU per micro-step (fixed shape)
    region_images: int = 48                 # at most this many images carry those texts
    texts_per_image: int = 5
    image_size: int = 224
    max_words: int = 30
    max_masks: int = 8
    mask_prob: float = 0.25
    num_workers: int = 4
    shuffle_buffer: int = 2000
    batches_per_epoch: int = 1000           # per rank; fixed so ranks never deadlock
    decoder: str = "pil"                    # pil | simplejpeg | torchvision (bench/loader.py compares them)
    max_tokens: Optional[int] = None        # text length L incl. [CLS]/[SEP]; None = max_words + 2 (X-VLM: 40)
    decode_reduce: bool = True              # decode JPEGs at 1/2, 1/4, 1/8 scale when the crop still covers image_size
    crop_scale: list = field(default_factory=lambda: [0.2, 1.0])   # random resized crop area (X-VLM); captions
                                                                   # that describe the whole image want ~[0.8, 1]
    mean: list = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])   # CLIP; ImageNet: 0.485 0.456 0.406
    std: list = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])   # CLIP; ImageNet: 0.229 0.224 0.225
    normalize_in_loader: bool = False       # false: workers send uint8 images (4x fewer bytes); the step normalises
    decode_on: str = "cpu"                  # cpu: workers decode + augment | gpu: workers ship JPEG bytes + view
                                            # parameters, the main process decodes a batch at a time on its device

    def validate(self) -> None:
        check_min("data", self, {"batch_size": 1, "num_workers": 0, "batches_per_epoch": 1, "image_size": 1,
                                 "max_words": 1, "texts_per_image": 1, "region_texts": 0, "region_images": 0,
                                 "max_masks": 0, "shuffle_buffer": 1, "max_tokens": 3})
        if self.decode_on not in ("cpu", "gpu"):
            raise ConfigError(f"data.decode_on: expected cpu or gpu, got {self.decode_on!r}")
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ConfigError(f"data.mask_prob: must be in [0, 1], got {self.mask_prob}")
        if self.region_texts > 0 and self.region_images < 1:
            raise ConfigError("data.region_images: must be >= 1 when data.region_texts > 0")


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    run: RunConfig = field(default_factory=RunConfig)
