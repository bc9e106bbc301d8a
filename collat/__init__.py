"""collat: CoLLAT (Contrastive Locked Language and Audio Tuning) with fused Triton and CUDA kernels."""
from collat.ops import cross_attention, greedy_match, optimal_match, token_l1_loss

__version__ = "0.1.0"
__all__ = ["CoLLAT", "CoLLATConfig", "load_model", "greedy_match", "optimal_match", "token_l1_loss",
           "cross_attention"]


def __getattr__(name):
    # The model pulls in transformers and open_clip: load it only when asked for.
    if name in ("CoLLAT", "CoLLATConfig", "load_model"):
        from collat import model

        return getattr(model, name)
    raise AttributeError(f"module 'collat' has no attribute {name!r}")
