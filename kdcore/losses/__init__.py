"""Distillation losses: tensor in, 0-d tensor out; conventions of RepDistiller (Tian et al.).

One module per family; every public name is re-exported here explicitly.
"""

from kdcore.losses.at import attention_map, attention_transfer
from kdcore.losses.contrastive import info_nce
from kdcore.losses.cosine import cosine_distance
from kdcore.losses.crd import CRDLoss, Embed, nce_loss
from kdcore.losses.hint import hint_mse
from kdcore.losses.kd import kd_kl
from kdcore.losses.pkt import pkt
from kdcore.losses.rkd import rkd
from kdcore.losses.sp import similarity_preserving

__all__ = [
    "CRDLoss",
    "Embed",
    "attention_map",
    "attention_transfer",
    "cosine_distance",
    "hint_mse",
    "info_nce",
    "kd_kl",
    "nce_loss",
    "pkt",
    "rkd",
    "similarity_preserving",
]
