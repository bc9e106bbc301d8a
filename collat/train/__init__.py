"""Training CoLLAT, one concern per module:

    loop.py         run(): set up, the steps, the final evaluation
    batching.py     the training data, the evaluation sets, the batch stream
    checkpoint.py   atomic checkpoints, crash recovery and exact resume
    state_io.py     the trainer state as safetensors + JSON (nothing unpickled on resume)
    distributed.py  torchrun: process group, per-rank seeds, reductions
    optim.py        AdamW and the learning-rate schedule
    runlog.py       log.jsonl, TensorBoard and losses.png
    signals.py      Ctrl-C / SIGTERM: checkpoint and stop
    __main__.py     `python -m collat.train`
"""
from collat.config import TrainConfig
from collat.train.loop import NonFiniteLossError, run

__all__ = ["run", "TrainConfig", "NonFiniteLossError"]
