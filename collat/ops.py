"""Python front of the custom ops: input validation, then dispatch to the compiled extension
(collat._C), the Triton kernels (collat.kernels) or, where that backend is missing, the reference."""
from collat.kernels.attention import cross_attention
from collat.kernels.token_l1 import token_l1_loss
from collat.matching import greedy_match, optimal_match

__all__ = ["greedy_match", "optimal_match", "token_l1_loss", "cross_attention"]
