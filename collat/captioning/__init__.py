"""Audio captioning on a frozen CoLLAT (paper section 5.3).

    vocab.py     caption words and the decoder's vocabulary
    decoder.py   the 1-layer transformer decoder: training, greedy and beam search, saving
    caption.py   the features the decoder reads; captioning new files with a saved captioner
    metrics.py   BLEU, ROUGE-L, CIDEr-D (pure Python); which tokenizer and implementation score a table
    aac.py       the optional aac-metrics package: its BLEU/ROUGE-L/CIDEr-D, PTB tokenizer, METEOR, SPICE
    __main__.py  `python -m collat.captioning [train] ...` and `python -m collat.captioning caption FILE...`
"""
from collat.captioning.caption import Captioner, caption_files, extract_memory
from collat.captioning.decoder import (
    CaptionDecoder,
    CaptionerConfig,
    CaptionTraining,
    load_captioner,
    save_captioner,
    sequence_log_prob,
    train_captioner,
)
from collat.captioning.metrics import (
    bleu,
    caption_metrics,
    cider_d,
    external_metrics,
    rouge_l,
)
from collat.captioning.vocab import Vocabulary, tokenize_caption

__all__ = ["Captioner", "caption_files", "extract_memory", "CaptionDecoder", "CaptionerConfig", "CaptionTraining",
           "load_captioner", "save_captioner", "sequence_log_prob", "train_captioner", "bleu", "caption_metrics",
           "cider_d", "external_metrics", "rouge_l", "Vocabulary", "tokenize_caption"]
