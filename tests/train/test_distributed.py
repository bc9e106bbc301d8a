"""Multi-process training: 2 gloo ranks on 127.0.0.1 against 1 process over the same global batch.

One 2-rank session (torch.multiprocessing.spawn, OMP_NUM_THREADS=1, torchrun's environment variables)
computes everything the tests compare and saves it with torch.save; the comparisons happen here in the
parent, a single process without a group. The command line is checked once through real torchrun.
"""
import dataclasses
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import ToneDataset, model_config, train_config

from collat.data.collate import collate
from collat.data.manifest import ManifestEntry, write_manifest
from collat.data.shards import write_shards
from collat.model import CoLLAT
from collat.model import losses as L
from collat.train import run
from collat.train.__main__ import parse_args
from collat.train.checkpoint import CHECKPOINT_DIR
from collat.train.runlog import LOG_NAME, PLOT_NAME, read_log
from collat.train.state_io import read_trainer_state

WORLD = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unaugmented(out, **overrides):
    """Augmentation draws per rank (a K-rank run is another random run than one process's), so the runs
    compared across world sizes train without it."""
    return train_config(out, augment=False, **overrides)


def spawn(fn, *args):
    """Run fn(rank, *args) on WORLD ranks, with the environment torchrun would give them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # inherited by the children before they import torch
        patch.setenv("MASTER_ADDR", "127.0.0.1")
        patch.setenv("MASTER_PORT", str(free_port()))
        patch.setenv("WORLD_SIZE", str(WORLD))
        mp.spawn(_as_rank, args=(fn, args), nprocs=WORLD, join=True)


def _as_rank(rank, fn, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        fn(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- the losses
# Rank r owns rows SHARDS[r] of the global batch. The valid token counts differ between the ranks
# (20 vs 3) and so do the numbers of noisy twins (2 vs 1): a per-rank mean averaged by DDP would be
# wrong for both L_ct and L_ut.
B, N, D_IN, D = 6, 7, 5, 8
SHARDS = [[0, 1, 2], [3, 4, 5]]
NOISY = [[0, 1], [3]]
LENGTHS = [7, 7, 6, 1, 0, 2]


def loss_inputs():
    g = torch.Generator().manual_seed(1)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return {"audio": r(B, N, D_IN), "noisy": r(B, N, D_IN), "h_t": r(B, N, D), "z_t": F.normalize(r(B, D), dim=-1),
            "w": r(D_IN, D), "proj": r(D, D), "t": torch.tensor(2.0, dtype=torch.float64)}


def all_losses(x, rows, noisy_rows, local_loss, gather_with_grad=True):
    """The three losses of `rows` (local rows under a group), with gradients to w, proj and t."""
    w = x["w"].clone().requires_grad_()
    proj = x["proj"].clone().requires_grad_()
    t = x["t"].clone().requires_grad_()
    h_at = x["audio"][rows] @ w
    l_ct, _ = L.cross_token_loss(h_at, x["h_t"][rows], torch.tensor(LENGTHS)[rows], ops="reference")
    local_noisy = [rows.index(i) for i in noisy_rows]
    l_ut = L.unimodal_token_loss(h_at[local_noisy], x["noisy"][noisy_rows] @ w, ops="reference")
    z_a = F.normalize(h_at.mean(1) @ proj, dim=-1)
    l_cg = L.ContrastiveLoss(local_loss, gather_with_grad)(z_a, x["z_t"][rows], t.exp())
    total = l_ct + l_cg + 0.5 * l_ut
    total.backward()
    return {"values": torch.stack([l_ct, l_cg, l_ut, total]).detach(), "w": w.grad, "proj": proj.grad, "t": t.grad}


# ------------------------------------------------------------------------------------------- the 2-rank session
def tiny_config():
    # lambda_ut = 0: no noisy twins, so no per-rank random noise and 1 vs 2 ranks are comparable
    # (L_ut's normalisation across ranks is covered by the loss-level test).
    return dataclasses.replace(model_config(), lambda_ut=0.0)


GLOBAL_BATCH = [0, 1, 2, 3]


def gradients(model_cfg, indices, ddp):
    torch.manual_seed(0)
    model = CoLLAT(model_cfg)
    module = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    batch = collate([ToneDataset()[i] for i in indices])
    terms = module(batch["wave"], batch["text"])
    terms["loss"].backward()
    return {"loss": terms["loss"].detach(), "l_ct": terms["l_ct"].detach(), "l_cg": terms["l_cg"].detach(),
            **{name: p.grad for name, p in model.named_parameters() if p.requires_grad}}


def _session(rank, x, model_cfg, out_dir):
    dist.init_process_group("gloo")  # from the torchrun-style environment
    saved = {}
    # 1. The losses on unequal shards, with a DDP-style mean of values and gradients over the ranks.
    for local_loss in (False, True):
        for gather_with_grad in (True, False):
            got = all_losses(x, SHARDS[rank], NOISY[rank], local_loss, gather_with_grad)
            for value in got.values():
                dist.all_reduce(value)
                value /= WORLD
            saved[f"losses local_loss={local_loss} gather_with_grad={gather_with_grad}"] = got
    # 2. DDP gradients of the model on this rank's half of the global batch.
    grads = gradients(model_cfg, GLOBAL_BATCH[2 * rank : 2 * rank + 2], ddp=True)
    for key in ("loss", "l_ct", "l_cg"):  # as logged: the mean of the ranks' shares
        dist.all_reduce(grads[key])
        grads[key] /= WORLD
    saved["grads"] = grads
    if rank == 0:
        torch.save(saved, os.path.join(out_dir, "session.pt"))
    # 3. The training loop, stopped (and checkpointed) after 2 of 4 steps.
    result = run(model_cfg, unaugmented(os.path.join(out_dir, "two"), stop_at_step=2), train_dataset=ToneDataset())
    assert result["status"] == "stopped" and result["step"] == 2
    assert dist.is_initialized()  # run() leaves alone a group it did not create
    # 4. SIGTERM reaches rank 1 alone, during step 1: both ranks finish that step and stop together.
    original, calls = CoLLAT.compute_losses, {"n": 0}

    def signal_rank_1(self, wave, texts, *args, **kwargs):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, wave, texts, *args, **kwargs)

    CoLLAT.compute_losses = signal_rank_1
    try:
        result = run(model_cfg, train_config(os.path.join(out_dir, "signal"), save_every=100),
                       train_dataset=ToneDataset())
    finally:
        CoLLAT.compute_losses = original
    torch.save((result["status"], result["step"]), os.path.join(out_dir, f"signal-{rank}.pt"))


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    out = tmp_path_factory.mktemp("two-ranks")
    spawn(_session, loss_inputs(), tiny_config(), str(out))
    return out, torch.load(out / "session.pt")


def test_gathered_losses_match_one_process(session):
    _, saved = session
    x = loss_inputs()
    expected = all_losses(x, list(range(B)), NOISY[0] + NOISY[1], local_loss=False)
    # The per-rank counts really differ, so a plain average of per-rank means would be wrong.
    lengths = torch.tensor(LENGTHS)
    assert lengths[SHARDS[0]].sum() != lengths[SHARDS[1]].sum() and len(NOISY[0]) != len(NOISY[1])
    for local_loss in (False, True):
        got = saved[f"losses local_loss={local_loss} gather_with_grad=True"]
        for key in ("values", "w", "proj", "t"):
            torch.testing.assert_close(got[key], expected[key], rtol=1e-10, atol=1e-12,
                                       msg=lambda m, k=key, ll=local_loss: f"{k} (local_loss={ll}): {m}")
        # Without the gradient through the gather (open_clip's default) the loss values and the
        # temperature's gradient are still exact; the features' gradients are not.
        got = saved[f"losses local_loss={local_loss} gather_with_grad=False"]
        torch.testing.assert_close(got["values"], expected["values"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["t"], expected["t"], rtol=1e-10, atol=1e-12)
        if not local_loss:  # each rank's features get their own part of the full loss's gradient: 1/K after DDP
            torch.testing.assert_close(got["proj"], expected["proj"] / WORLD, rtol=1e-10, atol=1e-12)


def test_ddp_gradients_match_one_process(session):
    _, saved = session
    got = saved["grads"]
    expected = gradients(tiny_config(), GLOBAL_BATCH, ddp=False)
    assert got.keys() == expected.keys() and len(expected) > 10
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_a_signal_to_one_rank_stops_all_ranks_with_a_checkpoint(session):
    out, _ = session
    statuses = [torch.load(out / f"signal-{rank}.pt") for rank in range(WORLD)]
    assert statuses == [("interrupted by a signal to another rank", 2), ("interrupted by SIGTERM", 2)]
    state = read_trainer_state(out / "signal" / CHECKPOINT_DIR)
    assert state["step"] == 2 and [r["step"] for r in rows(out / "signal")] == [0, 1]


def rows(out):
    return read_log(os.path.join(out, LOG_NAME))


def test_two_process_run_matches_one_and_resumes_in_one(session, tmp_path):
    out, _ = session
    model_cfg = tiny_config()
    # The same losses and gradient norms as an uninterrupted 1-process run...
    one = run(model_cfg, unaugmented(tmp_path / "one"), train_dataset=ToneDataset())
    assert one["status"] == "completed" and one["step"] == 4
    two = str(out / "two")
    assert [r["step"] for r in rows(two)] == [0, 1]
    assert sorted(os.listdir(two)) == [CHECKPOINT_DIR, LOG_NAME, PLOT_NAME]  # no .tmp / .old left
    keys = ("loss", "l_ct", "l_cg", "grad_norm", "logit_scale")
    for a, b in zip(rows(two), rows(tmp_path / "one")):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)
    state = read_trainer_state(os.path.join(two, CHECKPOINT_DIR))
    assert state["step"] == 2 and len(state["rng_per_rank"]) == WORLD
    assert state["rng_per_rank"][0]["torch"].ne(state["rng_per_rank"][1]["torch"]).any()  # per-rank noise streams

    # ...and the 2-process checkpoint resumes in 1 process and continues on the same curve.
    resumed = run(model_cfg, unaugmented(two, resume=True), train_dataset=ToneDataset())
    assert resumed["status"] == "completed" and resumed["step"] == 4
    assert [r["step"] for r in rows(two)] == [0, 1, 2, 3]
    for a, b in zip(rows(two)[2:], rows(tmp_path / "one")[2:]):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-3), (a["step"], key)
    final_two = CoLLAT.from_pretrained(os.path.join(two, CHECKPOINT_DIR)).state_dict()
    final_one = CoLLAT.from_pretrained(str(tmp_path / "one" / CHECKPOINT_DIR)).state_dict()
    for key, value in final_one.items():
        torch.testing.assert_close(final_two[key], value, rtol=1e-3, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


# ------------------------------------------------------------------------------------------- data from files, the CLI
def write_clips(folder, split, count, corrupt=()):
    entries = []
    os.makedirs(folder, exist_ok=True)
    for k in range(count):
        path = os.path.join(folder, f"{split}-{k}.wav")
        if k in corrupt:
            with open(path, "wb") as f:
                f.write(b"RIFF\x00\x00 not a wave file")
        else:
            t = np.arange(8000) / 16000
            soundfile.write(path, 0.3 * np.sin(2 * np.pi * 220.0 * 2 ** (k % 4) * t), 16000, subtype="PCM_16")
        entries.append(ManifestEntry(path, [["violin", "flute", "drum", "bell"][k % 4]], split=split))
    return entries


SMALL = ["--batch-size", "4", "--audio-size", "micro", "--clip-seconds", "0.5", "--depth", "1", "--amp", "none",
         "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    entries = write_clips(str(folder / "audio"), "train", 8, corrupt=(5,)) + write_clips(str(folder / "audio"), "test", 4)
    return entries, write_manifest(entries, str(folder / "manifest.csv"))


def test_manifest_training_counts_skipped_files(clips, tmp_path, capsys):
    # Every train row is read in an epoch of 2 steps, so the broken one is met, reported, skipped and
    # counted at the end; evaluation runs on the labelled test rows.
    _, manifest = clips
    model_cfg, train_cfg = parse_args(["--train-manifest", manifest, "--out", str(tmp_path), "--steps", "2",
                                         "--eval-size", "4", *SMALL])
    result = run(model_cfg, train_cfg)
    assert result["status"] == "completed" and result["skipped_files"] == 1
    assert set(result["trained"]) == {"test top-1", "test top-1 noisy"}
    err = capsys.readouterr().err
    assert "1 unreadable audio file(s) skipped" in err and "train-5.wav" in err


def test_torchrun_cli_on_shards(clips, tmp_path):
    # 7 readable clips in 4 shards split over 2 ranks; 3 steps of 2 x 2 samples, so every rank starts a
    # second epoch of its shards (set_epoch) before the end. Open_clip's local loss over gathered features.
    entries, _ = clips
    shards = str(tmp_path / "shards")
    write_shards(entries, shards, split="train", samples_per_shard=2)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "collat.train",
           "--train-shards", shards, "--out", str(out), "--steps", "3", "--save-every", "1", "--no-eval",
           "--local-loss", *SMALL]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert [r["step"] for r in rows(out)] == [0, 1, 2]  # rank 0 alone writes the log
    assert proc.stdout.count("0 unreadable audio file(s) skipped (summed over 2 rank(s))") == 1
    state = read_trainer_state(out / CHECKPOINT_DIR)
    assert state["step"] == 3 and len(state["rng_per_rank"]) == 2
    saved = CoLLAT.read_config(str(out / CHECKPOINT_DIR))
    assert saved.local_loss and saved.gather_with_grad and saved.audio_size == "micro"
