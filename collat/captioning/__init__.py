"""Audio captioning on a frozen CoLLAT (paper section 5.3).

    vocab.py     caption words and the decoder's vocabulary
    decoder.py   the 1-layer transformer decoder: training, greedy and beam search, saving
    metrics.py   BLEU, ROUGE-L, CIDEr-D (pure Python), METEOR and SPICE through aac-metrics
    __main__.py  `python -m collat.captioning`
"""
from collat.captioning.decoder import (
    CaptionDecoder,
    CaptionerConfig,
    CaptionTraining,
    load_captioner,
    save_captioner,
    sequence_log_prob,
    train_captioner,
)
from collat.captioning.metrics import bleu, caption_metrics, cider_d, external_metrics, rouge_l
from collat.captioning.vocab import Vocabulary, tokenize_caption

__all__ = ["CaptionDecoder", "CaptionerConfig", "CaptionTraining", "load_captioner", "save_captioner",
           "sequence_log_prob", "train_captioner", "bleu", "caption_metrics", "cider_d", "external_metrics",
           "rouge_l", "Vocabulary", "tokenize_caption"]
