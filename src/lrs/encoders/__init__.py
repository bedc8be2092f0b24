"""Stage 2a: encoders that map a residual-stream state h [.., d] to a latent z [.., n] and a latent change back to Δh.

Every encoder owns its input normalisation. `encode` gives the dense float32 latent the reward model sees;
`decode_delta(z_new, z_old, h)` gives the hidden-state change that moves the latent from z_old to z_new at h.
Implementations: a small TopK SAE trained here, an identity and a PCA baseline, and adapters for SAELens,
EleutherAI sparsify and the LRS / thinking-llms `.pt` dict. Saved as safetensors + a JSON sidecar.
"""

from lrs.encoders.adapters import SAELensEncoder, SparsifyEncoder, from_saelens, from_sparsify, load_lrs_pt
from lrs.encoders.base import FORMAT, Encoder, check_compatible, encoder_hash
from lrs.encoders.baselines import IdentityEncoder, PCAEncoder, fit_identity, fit_pca
from lrs.encoders.io import KINDS, load_encoder, save_encoder
from lrs.encoders.topk import TopKSAE, fit_topk_sae

__all__ = [
    "Encoder",
    "TopKSAE",
    "IdentityEncoder",
    "PCAEncoder",
    "SAELensEncoder",
    "SparsifyEncoder",
    "fit_topk_sae",
    "fit_identity",
    "fit_pca",
    "from_saelens",
    "from_sparsify",
    "load_lrs_pt",
    "save_encoder",
    "load_encoder",
    "encoder_hash",
    "check_compatible",
    "FORMAT",
    "KINDS",
]
