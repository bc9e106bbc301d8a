"""The training loop: set up (data, model, optimizer, resume), the steps, then the final evaluation.

`run()` trains one model. Under torchrun (WORLD_SIZE > 1) it joins the process group and runs a
DistributedDataParallel replica per rank; rank 0 alone logs, shows progress and writes checkpoints.
Every step is appended to RUN/log.jsonl; a checkpoint is written every save_every steps, at the end
and on SIGINT/SIGTERM (the step in flight finishes first); RUN/results.json holds the final table.

A step never waits for the device: its losses and gradient norm stay on the device until they are
read, all at once (one host sync), every log_every steps and before every checkpoint or evaluation.
A non-finite loss or gradient skips its own optimizer update on the device (AdamW's found_inf), and
the next read stops the run with NonFiniteLossError naming that step, before any checkpoint could
hold what came after it. Under torchrun a signal to one rank is seen by all at that read.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from collat.config import CoLLATConfig, TrainConfig, load_preset
from collat.device import autocast
from collat.evaluate.quick import (
    as_clip_set,
    chance_levels,
    format_table,
    zero_shot_table,
)
from collat.fileio import atomic_write_text
from collat.model import CoLLAT
from collat.model.losses import LOGIT_SCALE_MAX
from collat.prompts import make_prompt
from collat.train.augment import augmented_inputs
from collat.train.batching import batch_stream, datasets
from collat.train.checkpoint import (
    CHECKPOINT_DIR,
    checkpoint_folders,
    find_checkpoint,
    load_checkpoint,
    rng_state,
    save_on_main,
    set_rng_state,
)
from collat.train.distributed import (
    World,
    rank_seed,
    reduce_mean,
    seed_everything,
    setup_distributed,
)
from collat.train.optim import build_optimizer
from collat.train.runlog import (
    LOG_NAME,
    PLOT_NAME,
    RunLog,
    plot_losses,
    set_aside,
    truncate_log,
)
from collat.train.signals import StopFlag

RESULTS_NAME = "results.json"
UNTRAINED_NAME = "untrained_eval.json"


class NonFiniteLossError(RuntimeError):
    pass


def run(model_config: CoLLATConfig | None = None, train_config: TrainConfig | None = None,
        train_dataset=None, eval_sets: dict | None = None, model: CoLLAT | None = None) -> dict:
    """Train, then evaluate. Returns a dict with the final step, status, the last losses and the
    evaluation results (untrained and trained). Data sets default to the embedded soundfont data;
    `eval_sets` maps a name to a ClipSet or a map-style data set with class_names.

    Under torchrun it joins the process group, and destroys it at the end or on an error if it
    created it. Logged losses are the global batch's (the mean of the ranks' shares)."""
    model_config = model_config or load_preset("cpu")[0]
    train_config = train_config or TrainConfig()
    model_config.validate()
    train_config.validate()
    world, device = setup_distributed(train_config.device)
    try:
        trainer = Trainer(model_config, train_config, world, device)
        trainer.prepare(train_dataset, eval_sets, model)
        return trainer.train_and_evaluate()
    finally:
        if world.owns_group and dist.is_initialized():
            dist.destroy_process_group()


class Trainer:
    def __init__(self, model_config: CoLLATConfig, train_config: TrainConfig, world: World, device: torch.device):
        self.model_config, self.config, self.world, self.device = model_config, train_config, world, device
        self.out = train_config.out
        self.log_path = os.path.join(self.out, LOG_NAME)

    # ------------------------------------------------------------------------------------ set up
    def prepare(self, train_dataset, eval_sets, model) -> None:
        cfg, world = self.config, self.world
        if world.is_main:
            os.makedirs(self.out, exist_ok=True)
        if cfg.batch_size % world.size:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the world size {world.size}")
        if train_dataset is None or (eval_sets is None and cfg.evaluate):
            default_train, default_eval = datasets(self.model_config, cfg)
            train_dataset = train_dataset if train_dataset is not None else default_train
            eval_sets = eval_sets if eval_sets is not None else default_eval
        self.train_dataset = train_dataset
        self.eval_sets = {name: as_clip_set(name, data) for name, data in (eval_sets or {}).items()}

        seed_everything(cfg.seed)
        self.model = (model if model is not None else CoLLAT(self.model_config)).to(self.device)
        self.model.prepare_training(cfg.compile, cfg.fp8)  # before the optimizer: fp8 swaps AST's linear layers
        if hasattr(train_dataset, "class_names"):
            check_prompt_length(self.model, train_dataset.class_names)
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg, self.device)
        self.checkpoint = find_checkpoint(self.out) if cfg.resume else None
        self.start_step = self._resume_or_start()

    def _resume_or_start(self) -> int:
        cfg, world = self.config, self.world
        if cfg.resume and self.checkpoint is None and world.is_main:
            found = [name for name in checkpoint_folders(self.out).values() if os.path.isdir(name)]
            print(f"--resume: no complete checkpoint in {self.out}"
                  + (f" ({', '.join(found)} incomplete)" if found else "") + "; starting from scratch", file=sys.stderr)
        if self.checkpoint is not None:
            step = load_checkpoint(self.checkpoint, self.model, self.optimizer, self.scheduler, world, cfg)
            if world.is_main:
                truncate_log(self.log_path, step - 1)
                print(f"resumed from {self.checkpoint} at step {step}")
            return step
        if world.is_main and (kept := set_aside(self.log_path)):
            print(f"starting at step 0: the previous {LOG_NAME} is kept as {kept}", file=sys.stderr)
        if world.size > 1:  # the model is built; from here on each rank draws its own noise
            seed_everything(rank_seed(cfg.seed, world.rank))
        return 0

    def _untrained_table(self) -> dict | None:
        """The untrained model's table (computed once per run folder; a resume reads it back)."""
        if not (self.config.evaluate and self.world.is_main and self.eval_sets):
            return None
        path = os.path.join(self.out, UNTRAINED_NAME)
        if os.path.isfile(path) and self.checkpoint is not None:
            with open(path) as f:
                return json.load(f)
        state = rng_state()  # evaluation must not shift the training RNG streams
        table = self._evaluate()
        set_rng_state(state)
        atomic_write_text(path, json.dumps(table, indent=2))
        return table

    def _evaluate(self) -> dict:
        return zero_shot_table(self.model, self.eval_sets, self.config.eval_noise_std, self.config.eval_batch_size)

    # ------------------------------------------------------------------------------------ the steps
    def train_and_evaluate(self) -> dict:
        untrained = self._untrained_table()
        status, step, last = self._train()
        result = {"status": status, "step": step, "last": last, "out": self.out}
        if self.world.is_main:
            plot_losses(self.log_path, os.path.join(self.out, PLOT_NAME))
        if hasattr(self.train_dataset, "skipped"):  # unreadable files skipped (manifest / shard data)
            result["skipped_files"] = report_skipped(self.train_dataset, self.device, self.world)
        if status != "completed":
            if self.world.is_main:
                print(f"{status} at step {step}; checkpoint in {os.path.join(self.out, CHECKPOINT_DIR)} "
                      "(continue with --resume)")
            return result
        if self.config.evaluate and self.world.is_main and self.eval_sets:
            self._final_table(untrained, result)
        if self.world.size > 1:
            dist.barrier()  # rank 0's evaluation and files are done before any rank leaves the group
        return result

    def _train(self) -> tuple[str, int, dict]:
        cfg, world = self.config, self.world
        train_module = self.model
        if world.size > 1:
            # No buffer changes during training (no batch norm), so DDP need not broadcast them every step;
            # its constructor still copies rank 0's parameters and buffers to every rank once.
            train_module = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
        end_step = cfg.steps if cfg.stop_at_step is None else min(cfg.steps, cfg.stop_at_step)
        self.bar = self._progress_bar()
        status, last, done = "completed", {}, self.start_step
        self.pending, self.tick = [], time.perf_counter()
        self.model.train()
        with StopFlag() as stop, RunLog(self.out, cfg.report_to, self.start_step) if world.is_main \
                else contextlib.nullcontext() as self.runlog:
            stream = batch_stream(self.train_dataset, cfg, world, self.start_step) if done < end_step else iter(())
            for step, batch in stream:
                self.pending.append(self._step(train_module, step, batch, stop))
                done = step + 1
                saving = done % cfg.save_every == 0 or done >= end_step
                evaluating = cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps
                signalled = world.size == 1 and stop.signal is not None  # a Python flag: no sync
                if saving or evaluating or signalled or done % cfg.log_every == 0:
                    last, signalled = self._read_pending(stop)
                if signalled:
                    status = f"interrupted by {stop.signal or 'a signal to another rank'}"
                elif done >= end_step:
                    status = "completed" if done >= cfg.steps else "stopped"
                if evaluating and status == "completed":
                    self._evaluate_during_training(done)
                if status != "completed" or saving:
                    save_on_main(self.out, self.model, self.optimizer, self.scheduler, done, cfg, world)
                if status != "completed" or done >= cfg.steps:
                    break
        if self.bar is not None:
            self.bar.close()
        return status, done, last

    def _step(self, train_module, step: int, batch: dict, stop: StopFlag) -> dict:
        """One optimizer step, queued on the device without a host sync; returns what _read_pending logs."""
        model, world = self.model, self.world
        with autocast(self.device, self.config.amp):
            terms = train_module(**augmented_inputs(batch, step, self.config, self.device, self.world.rank))
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), self.config.grad_clip)
        # The global losses (mean of the ranks' shares), the gradient norm and, under torchrun, whether any
        # rank got a signal (torchrun signals every rank, but not necessarily within the same step): one
        # collective, and still nothing read on the host.
        values = torch.stack([terms[k].detach().float() for k in terms] + [grad_norm.detach().float()])
        if world.size > 1:
            values = torch.cat([values, values.new_tensor([float(stop.signal is not None)])])
            dist.all_reduce(values)
            values = values / world.size
        # A non-finite loss or gradient: AdamW skips this update on the device (weights and moments untouched).
        self.optimizer.found_inf = (~torch.isfinite(values[: len(terms) + 1]).all()).float()
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=LOGIT_SCALE_MAX)
        return {"step": step, "names": list(terms), "values": values, "lr": self.scheduler.get_last_lr()[0]}

    def _read_pending(self, stop: StopFlag) -> tuple[dict, bool]:
        """Read the queued steps' values (one host sync), log them, and stop at a non-finite one.
        Returns the last record and whether any rank got a signal."""
        pending, self.pending = self.pending, []
        rows = torch.stack([entry["values"] for entry in pending]).tolist()
        now = time.perf_counter()
        samples_per_s = self.config.batch_size * len(pending) / max(now - self.tick, 1e-9)
        self.tick = now
        records, signalled = [], stop.signal is not None
        for entry, row in zip(pending, rows):
            names = entry["names"] + ["grad_norm"]
            record = {"step": entry["step"], **dict(zip(names, row)), "lr": entry["lr"], "samples_per_s": samples_per_s}
            signalled = signalled or (self.world.size > 1 and row[len(names)] > 0)
            if not all(math.isfinite(record[name]) for name in names):
                self._write_records(records)
                raise self._non_finite(record, names)
            records.append(record)
        self._write_records(records)
        return records[-1], signalled

    def _non_finite(self, record: dict, names: list[str]) -> NonFiniteLossError:
        kept = find_checkpoint(self.out)
        what = "loss" if not math.isfinite(record["loss"]) else "gradient"
        return NonFiniteLossError(
            f"non-finite {what} at step {record['step']}: " + ", ".join(f"{k}={record[k]:.4g}" for k in names)
            + f". That step's update was skipped and training stopped; the last good checkpoint is "
            f"{kept or 'none (none was written yet)'}. Try a lower --lr, --amp none, or a smaller --grad-clip."
        )

    def _write_records(self, records: list[dict]) -> None:
        if not (self.world.is_main and records):
            return
        self.runlog.write_steps(records)
        if self.bar is not None:
            record = records[-1]
            self.bar.update(len(records))
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", ct=f"{record['l_ct']:.3f}", cg=f"{record['l_cg']:.3f}",
                                 ut=f"{record['l_ut']:.4f}", sps=f"{record['samples_per_s']:.1f}")

    def _evaluate_during_training(self, done: int) -> None:
        """The zero-shot table of the model after `done` steps (rank 0; the RNG streams are kept)."""
        if self.world.is_main and self.eval_sets:
            state = rng_state()
            table = self._evaluate()
            set_rng_state(state)
            self.model.train()
            self.runlog.write_eval(done - 1, table)
            print(f"\nafter {done} steps: " + ", ".join(f"{k} {v:.3f}" for k, v in table.items()), flush=True)
        if self.world.size > 1:
            dist.barrier()

    def _progress_bar(self):
        if not (self.config.progress and self.world.is_main):
            return None
        from tqdm import tqdm

        return tqdm(total=self.config.steps, initial=self.start_step, desc="train", dynamic_ncols=True)

    # ------------------------------------------------------------------------------------ the end
    def _final_table(self, untrained: dict, result: dict) -> None:
        trained = self._evaluate()
        chance = chance_levels(self.eval_sets)
        print("\n" + format_table(untrained, trained, chance, self.config.eval_noise_std))
        result.update(untrained=untrained, trained=trained, chance=chance)
        payload = {"model_config": dataclasses.asdict(self.model.config),
                   "train_config": dataclasses.asdict(self.config), **result}
        atomic_write_text(os.path.join(self.out, RESULTS_NAME), json.dumps(payload, indent=2))


def report_skipped(dataset, device: torch.device, world: World) -> int:
    """Print (rank 0) and return the count of unreadable files skipped, summed over the ranks."""
    skipped = int(round(reduce_mean([float(dataset.skipped)], device, world)[0] * world.size))
    if world.is_main:
        if world.size == 1 and hasattr(dataset, "summary"):
            dataset.summary()
        else:
            print(f"collat.data: {skipped} unreadable audio file(s) skipped (summed over {world.size} rank(s))",
                  file=sys.stderr if skipped else sys.stdout, flush=True)
    return skipped


def check_prompt_length(model: CoLLAT, class_names: list[str]) -> None:
    """Fail early if the longest 3-class prompt would not fit the text context length."""
    tokenizer = model.text.tokenizer
    if not hasattr(tokenizer, "__call__") or not hasattr(tokenizer, "model_max_length"):
        return  # open_clip's tokenizer: 77 tokens hold any prompt of this data set
    by_length = sorted(class_names, key=lambda n: len(tokenizer(n)["input_ids"]), reverse=True)
    prompt = make_prompt(by_length[:3])
    needed = len(tokenizer(prompt)["input_ids"])
    if needed > model.context_length:
        raise ValueError(
            f"the longest prompt {prompt!r} needs {needed} tokens but the text context length is "
            f"{model.context_length}; raise --context-length"
        )
