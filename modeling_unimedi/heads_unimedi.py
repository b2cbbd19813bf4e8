"""Self-distillation heads, kept out of the backbone (as in DINOv2): the [CLS] head of L_icl and the patch head of L_pcl."""

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_unimedi import UniMedIConfig


class UniMedIDINOHead(nn.Module):
    """DINO projection head: 3-layer MLP -> L2-normalised bottleneck -> prototypes with unit-norm rows.

    Normalising the prototype rows in forward is DINO's weight-normalised last layer with its norm frozen at 1.
    """

    def __init__(self, config: UniMedIConfig):
        super().__init__()
        hidden = config.dino_hidden_dim
        self.mlp = nn.Sequential(
            nn.Linear(config.vision_config.hidden_size, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, config.dino_bottleneck_dim),
        )
        self.prototypes = nn.Linear(config.dino_bottleneck_dim, config.dino_out_dim, bias=False)

    def forward(self, hidden_states: torch.Tensor, freeze_prototypes: bool = False) -> torch.Tensor:
        """`freeze_prototypes`: no gradient to the prototypes (DINO's `freeze_last_layer` at the start of training)."""
        bottleneck = F.normalize(self.mlp(hidden_states), dim=-1)
        prototypes = self.prototypes.weight.detach() if freeze_prototypes else self.prototypes.weight
        return F.linear(bottleneck, F.normalize(prototypes, dim=-1))
