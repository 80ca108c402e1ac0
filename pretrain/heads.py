"""The small heads on top of the encoders: ITC projections, ITM / box MLPs, the BERT MLM head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform


def build_mlp_head(dim: int, out: int) -> nn.Sequential:
    """X-VLM's ITM / box head: Linear(d, 2d) -> LayerNorm -> GELU -> Linear(2d, out)."""
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim), nn.GELU(), nn.Linear(2 * dim, out))


class MLMHead(nn.Module):
    """BERT's MLM head (transform + decoder) with the decoder weight tied to the word embeddings.

    The tied weight is passed at call time rather than stored, so it stays one parameter (owned by the text
    encoder's embeddings) for the optimizer, DeepSpeed partitioning and checkpoints. Names follow
    transformers' `cls.predictions.*` (`transform.dense`, `transform.LayerNorm`, `bias`).
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        for m in self.transform.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=config.initializer_range)
                nn.init.zeros_(m.bias)

    def load_bert_head(self, sd: dict[str, Tensor]) -> bool:
        """Load `cls.predictions.{transform.*, bias}` from a BERT state dict; False when it has none.
        A bias of another vocabulary size is copied over the entries both share."""
        prefix = "cls.predictions."
        own = self.state_dict()
        found = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and k[len(prefix):] in own}
        if set(found) != set(own):
            return False
        if found["bias"].shape != own["bias"].shape:
            bias = own["bias"].clone()
            n = min(bias.shape[0], found["bias"].shape[0])
            bias[:n] = found["bias"][:n]
            found["bias"] = bias
        self.load_state_dict(found)
        return True

    def forward(self, hidden: Tensor, word_embeddings: Tensor) -> Tensor:
        return F.linear(self.transform(hidden), word_embeddings, self.bias)
