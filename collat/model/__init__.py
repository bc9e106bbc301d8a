"""The CoLLAT model: audio front end and encoder, locked text encoders, token interaction, losses."""
from collat.config import CoLLATConfig
from collat.model.collat import CoLLAT, load_model, noisy_twin_count

__all__ = ["CoLLAT", "CoLLATConfig", "load_model", "noisy_twin_count"]
