"""The per-worker recipe: setup, train, cleanup. kdcore's loop with Ray Train's context.

Each worker owns the student and its heads (DDP over gloo on CPU, NCCL on GPU), gets teacher features from
the job's ``features.mode``, and, for CRD, reads and writes the job's one bank actor: the next step's
negatives are fetched while this step computes, and updates go out without waiting.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch

from kdcore.checkpoints import load_checkpoint_file, save_checkpoint
from kdcore.loop import build_session, evaluate_split, load_split, train_epoch
from kdcore.spec.job import JobSpec
from services.membank.client import RemoteBank
from services.memtune import tune_for_models
from services.trainer.feeds import make_feed, teacher_shapes


def _event(config: dict[str, Any], rank: int, text: str) -> None:
    """Append a line to ``events_dir/rank<N>.log`` (where tests and operators can watch workers)."""
    if config.get("events_dir"):
        d = Path(config["events_dir"])
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"rank{rank}.log", "a") as f:
            f.write(f"{time.time():.3f} {text}\n")


def _dump_bank(config: dict[str, Any], name: str, bank: RemoteBank) -> None:
    """Save a bank's state into ``events_dir`` (what tests compare after a restart)."""
    if config.get("events_dir"):
        d = Path(config["events_dir"])
        d.mkdir(parents=True, exist_ok=True)
        torch.save(bank.state_dict(), d / name)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    # -- setup -----------------------------------------------------------------------------------
    job = JobSpec.model_validate(config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(job.train.torch_threads or max(1, int(job.train.cpus_per_worker)))
    tune_for_models()  # steps reuse their activations' heap pages (services/memtune.py)
    _event(config, rank, f"start pid={os.getpid()}")
    split = load_split(job)
    source = make_feed(job, split, config)
    _event(config, rank, f"source {type(source).__name__}")
    banks: dict[str, RemoteBank] = {}

    def bank_factory(n, dim, momentum, dtype, _pair=iter(config.get("bank_actors", {}).items())):
        pair, actor = next(_pair)
        banks[pair] = RemoteBank(actor, n, dim, worker=rank, seed=job.train.seed)
        return banks[pair]

    session = build_session(job, split, teacher_shapes(job, split, config),
                            bank_factory=bank_factory if config.get("bank_actors") else None)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            load_checkpoint_file(session, Path(d) / "state.pt")
            if rank == 0:
                for pair, bank in banks.items():
                    bank.load_state_dict(torch.load(Path(d) / f"bank-{pair}.pt", weights_only=False))
                    _dump_bank(config, f"restored-bank-{pair}.pt", bank)
        _event(config, rank, f"restored epoch={session.epoch} step={session.step} bank_updates="
               + ",".join(str(b.info()["updates"]) for b in banks.values()))
    elif rank == 0:
        for bank in banks.values():
            bank.reset()  # a (re)start from scratch: nothing of an earlier attempt stays in the bank
    model = session.distiller
    if world > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False,
                                              parallel_strategy_kwargs={"find_unused_parameters": False})
        torch.distributed.barrier()  # every worker sees the restored bank before the first fetch
    crd_k = {loss.pair: loss.params.nce_k for loss in job.losses if loss.kind == "crd"}

    # -- train -----------------------------------------------------------------------------------
    while session.epoch < job.train.epochs:
        epoch = session.epoch
        t0 = time.perf_counter()
        for bank in banks.values():
            bank.at_step(session.step)  # update tags are training steps: a replay after a restart dedupes
        metrics = train_epoch(session, source.epoch(epoch, rank, world), model=model,
                              hooks=BankPrefetch(banks, crd_k) if banks else None)
        metrics.update({"epoch": epoch + 1, "time/epoch_s": time.perf_counter() - t0, "rank": rank, "world": world})
        if (epoch + 1) % job.train.eval_every == 0 or epoch + 1 == job.train.epochs:
            metrics.update(evaluate_split(session.student, split, job.data.eval_batch_size))
        session.history.append(metrics)
        _event(config, rank, f"epoch {epoch + 1} done")
        for bank in banks.values():
            bank.flush()
        if world > 1:
            torch.distributed.barrier()  # every update of the epoch is in the bank before it is saved
        save_now = (epoch + 1) % job.train.checkpoint.every_epochs == 0 or epoch + 1 == job.train.epochs
        if save_now and rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(session, tmp)
                for pair, bank in banks.items():
                    torch.save(bank.state_dict(), Path(tmp) / f"bank-{pair}.pt")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)

    # -- cleanup ---------------------------------------------------------------------------------
    for bank in banks.values():
        bank.flush()
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        for pair, bank in banks.items():
            _dump_bank(config, f"final-bank-{pair}.pt", bank)
    close = getattr(source, "close", None)
    if close:
        close()


class BankPrefetch:
    """StepHooks for CRD's shared bank actor: the next step's positives and negatives are fetched while this step
    computes; the step's updates are sent without waiting. One per epoch."""

    def __init__(self, banks: dict[str, RemoteBank], nce_k: dict[str, int]) -> None:
        self.banks, self.nce_k = banks, nce_k
        self.started = False

    def before_step(self, batch, next_batch):
        if not self.started:  # the first step of the epoch fetches for itself; later ones were prefetched
            for pair, bank in self.banks.items():
                bank.prefetch(batch.idx, self.nce_k[pair])
            self.started = True
        inputs = {pair: bank.take() for pair, bank in self.banks.items()}
        if next_batch is not None:
            for pair, bank in self.banks.items():
                bank.prefetch(next_batch.idx, self.nce_k[pair])
        return inputs

    def after_step(self, distiller) -> None:
        for pair, (idx, v_s, v_t) in distiller.crd_updates().items():
            self.banks[pair].update(idx, v_s, v_t)
