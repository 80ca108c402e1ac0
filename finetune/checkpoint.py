"""Getting weights into VG-LAW: from a pretraining export (init) and from a fine-tuning export (evaluate/predict).

Both go through `pretrain.checkpoint.load_consolidated`, so a path may be a run dir, an `export/` dir, a
`.safetensors` file or a DeepSpeed checkpoint dir. The run's `config.yaml` is looked up next to it.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from finetune.config import FinetuneConfig
from finetune.model import VGLaw
from pretrain.checkpoint import load_consolidated
from pretrain.config import ConfigError, from_dict, load_config, read_yaml
from pretrain.config import ModelConfig as PretrainModelConfig
from pretrain.encoders import load_vision_weights


def find_config(path: str | Path) -> Path | None:
    """config.yaml of the run that `path` belongs to (export dir, run dir, weights file or checkpoint dir)."""
    p = Path(path)
    base = p.parent if p.is_file() else p
    for cand in (base / "config.yaml", base / "export" / "config.yaml", base.parent / "export" / "config.yaml",
                 base.parent / "config.yaml", base.parent.parent / "export" / "config.yaml",
                 base.parent.parent / "config.yaml"):
        if cand.is_file():
            return cand
    return None


def _load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_consolidated(path)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None


def adopt_pretrained_architecture(cfg: FinetuneConfig) -> FinetuneConfig:
    """Copy model.vision / model.text from the pretraining run's config so the shapes match its weights.

    The fine-tuning resolution stays data.image_size (position embeddings are resampled on load); the
    vision checkpoint is not re-read (the export's weights replace it)."""
    if not cfg.init_from:
        return cfg
    found = find_config(cfg.init_from)
    if found is None:
        raise ConfigError(f"init_from: no config.yaml found next to {cfg.init_from}")
    pre = from_dict(PretrainModelConfig, read_yaml(found).get("model") or {}, prefix="model.")
    cfg = copy.deepcopy(cfg)
    own = cfg.model.text.tokenizer
    if own and pre.text.tokenizer and Path(own).resolve() != Path(pre.text.tokenizer).resolve():
        print(f"[finetune] model.text.tokenizer={own} is not used: the pretrained text weights are indexed by the "
              f"pretraining run's tokenizer, {pre.text.tokenizer}", flush=True)
    cfg.model.vision = pre.vision
    cfg.model.vision.img_size = cfg.data.image_size
    cfg.model.vision.checkpoint = None
    cfg.model.text = pre.text
    if not pre.text.bert and pre.text.hidden_size % cfg.model.law_groups:
        raise ConfigError(f"model.law_groups={cfg.model.law_groups} must divide the pretrained text width "
                          f"{pre.text.hidden_size}")
    return cfg


def shrink_towards(module: torch.nn.Module, fresh: dict[str, torch.Tensor], keep: float) -> None:
    """Every floating-point tensor of `module` (parameters and buffers) <- keep * itself + (1 - keep) * its value in
    `fresh` (the module's own random initialisation): Ash & Adams' shrink-and-perturb warm start (NeurIPS 2020),
    with the fresh initialisation as the perturbation. Integer buffers (BatchNorm's step counter) are kept."""
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if t.is_floating_point():
                t.mul_(keep).add_(fresh[name].to(t.dtype), alpha=1.0 - keep)


def load_pretrained(model: VGLaw, path: str | Path,
                    parts: tuple[str, ...] | list[str] = ("vision", "text"), shrink: float = 1.0) -> dict[str, int]:
    """Initialise the ViT (`vision.*`, position embeddings resampled) and/or the text encoder (`text.*`) of `model`
    from a pretraining export (`parts`: config `init_parts`). `shrink` < 1 (config `init_shrink`) keeps that
    fraction of each loaded tensor and takes the rest from the model's fresh initialisation (shrink_towards).
    Returns how many tensors each received."""
    modules = {"vision": model.vision.vit, "text": model.text}
    fresh = {p: copy.deepcopy(modules[p].state_dict()) for p in parts} if shrink < 1.0 else {}
    sd = _load_weights(path)
    vision = {k[len("vision."):]: v for k, v in sd.items() if k.startswith("vision.")}
    text = {k[len("text."):]: v for k, v in sd.items() if k.startswith("text.")}
    if not vision or not text:
        raise ConfigError(f"init_from: {path} holds no 'vision.' and 'text.' weights (not a pretraining export)")
    loaded = {"vision": 0, "text": 0}
    if "vision" in parts:
        load_vision_weights(model.vision.vit, vision)
        loaded["vision"] = len(vision)
    if "text" in parts:
        missing, unexpected = model.text.load_state_dict(text, strict=False)
        if missing or unexpected:
            raise ConfigError(f"init_from: text encoder does not fit {path}: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
        loaded["text"] = len(text)
    for part, init in fresh.items():
        shrink_towards(modules[part], init, shrink)
    return loaded


def load_finetuned(path: str | Path, device: str | torch.device = "cpu") -> tuple[VGLaw, FinetuneConfig, Any]:
    """(model in eval mode, its FinetuneConfig, its tokenizer) from a fine-tuning export or checkpoint."""
    from finetune.task import build_model
    from shards.text import build_tokenizer

    found = find_config(path)
    if found is None:
        raise ConfigError(f"{path}: no config.yaml next to the checkpoint (expected <run>/export/config.yaml)")
    cfg = load_config(FinetuneConfig, found)
    sd = _load_weights(path)
    model_sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    if not model_sd:
        raise ConfigError(f"{path}: holds no 'model.' weights (not a fine-tuning checkpoint)")
    vocab = model_sd.get("text.embeddings.word_embeddings.weight")
    mcfg = copy.deepcopy(cfg.model)
    mcfg.vision.checkpoint = None                       # the checkpoint's weights replace any initial ones
    model = build_model(mcfg, int(vocab.shape[0]) if vocab is not None else None)
    missing, unexpected = model.load_state_dict(model_sd, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path}: does not fit the model in {found}: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    from pretrain.tokenizer import resolve_tokenizer_dir
    tokenizer = build_tokenizer(resolve_tokenizer_dir(cfg))
    return model.to(device).eval(), cfg, tokenizer
