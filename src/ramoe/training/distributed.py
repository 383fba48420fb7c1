"""Data-parallel fine-tuning over several processes: torchrun launches the workers, DDP syncs the gradients.

``launch_finetune`` starts ``python -m torch.distributed.run --nproc-per-node N`` on this
module, on this machine. Each worker (``main``) joins the process group (NCCL on GPUs, gloo on CPUs),
loads the model and runs the ordinary single-process loop of ``ramoe.training.finetune.train``
on a DDP-wrapped model. Rank 0 writes the checkpoint.

Every worker draws the same seeded order of examples and collates the same global batch of
``finetune.batch_size`` sequences. ``ShardedDataParallel`` then forwards only rows
``rank, rank + N, ...`` of it and scales the loss, so that the gradient that DDP averages over
the N processes is the gradient of the global batch. The causal-LM loss of a process is the sum
over its completion tokens divided by (global completion tokens / N). The alignment term is the
sum over its ci rows divided by (global ci rows / N). The logged values are the global means,
summed over the processes, so ``metrics.jsonl`` reads as in a single-process run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ramoe.training.finetune import IGNORE_INDEX

log = logging.getLogger(__name__)


def world_size() -> int:
    """Return the number of processes in the current process group, or 1 when none is initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """Return the rank of this process in the current process group, or 0 when none is initialised."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def shard_rows(batch_size: int, rank: int, world_size: int) -> list[int]:
    """Return the rows of a global batch that process ``rank`` forwards: rank, rank + world_size, ..."""
    return list(range(rank, batch_size, world_size))


def _sum_over_processes(value: torch.Tensor) -> torch.Tensor:
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def _report_global(local: torch.Tensor, world: int) -> torch.Tensor:
    """Give ``local`` the value of its mean over the processes but keep its own gradient.

    Each process's ``local`` is its share times N, so the mean over the processes is the global
    value. The gradient stays the local one, which DDP then averages.
    """
    reported = _sum_over_processes(local) / world
    return local + (reported - local.detach())


class ShardedDataParallel(DistributedDataParallel):
    """DDP that takes the whole global batch and forwards this process's rows of it.

    Keyword arguments are those of ``training_step``'s forward: ``input_ids``,
    ``attention_mask`` and ``labels``, each (global batch, T). ``config`` is the wrapped model's,
    so ``describe_moe`` and ``RouterCapture`` accept the wrapper: its router module names start
    with ``module.``.
    """

    @property
    def config(self):
        return self.module.config

    def forward(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, **kwargs):
        world, this_rank = world_size(), rank()
        rows = shard_rows(input_ids.shape[0], this_rank, world)
        local_labels = labels[rows]
        if not rows:
            # A last batch smaller than the process count leaves this process without rows, but
            # every process must run forward and backward for DDP's all-reduce. Row 0 with every
            # label ignored contributes a zero loss and zero gradients.
            rows = [0]
            local_labels = torch.full_like(labels[:1], IGNORE_INDEX)
        # The causal-LM loss predicts token t + 1 from position t, so label 0 never counts.
        global_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
        out = super().forward(
            input_ids=input_ids[rows],
            attention_mask=attention_mask[rows],
            labels=local_labels,
            num_items_in_batch=max(global_tokens, 1) / world,
            **kwargs,
        )
        # NOTE: a model whose config sets output_router_logits adds its load-balancing loss to
        # out.loss, computed over this process's tokens only, so that term is not the global one.
        out.loss = _report_global(out.loss, world)
        return out


class ShardedAligner:
    """RoutingAligner wrapper: each process aligns its own rows, and the term keeps the global mean.

    Called like the RoutingAligner with the global batch's examples and (global batch, T) span
    mask. The router logits in ``capture`` come from this process's rows only, in shard order.
    """

    def __init__(self, aligner):
        self.aligner = aligner

    def __call__(self, capture, examples: Sequence, span_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
        world, this_rank = world_size(), rank()
        rows = shard_rows(len(examples), this_rank, world)
        global_rows = sum(1 for e in examples if e.is_ci and e.item_id in self.aligner.teacher)
        # With no rows of its own this process forwarded a dummy row (see ShardedDataParallel),
        # which never enters the alignment term.
        if rows:
            mean, local_rows = self.aligner(capture, [examples[i] for i in rows], span_mask[rows])
        else:
            mean, local_rows = torch.zeros((), device=span_mask.device), 0
        local = mean * local_rows * world / max(global_rows, 1)
        return _report_global(local, world), global_rows


def wrap_model(model: torch.nn.Module, device: str) -> ShardedDataParallel:
    """Wrap ``model`` (already on ``device``) in ShardedDataParallel for the current process group."""
    device_ids = [torch.device(device).index] if device.startswith("cuda") else None
    # Every trainable tensor of the supported families takes part in each forward (the experts
    # of a layer are one fused tensor), so DDP need not search for unused parameters.
    return ShardedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)


def _visible_gpu_ids(count: int) -> list[str]:
    visible = [entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
    return visible[:count] if len(visible) >= count else [str(index) for index in range(count)]


def _claim_gpus(processes: int) -> list[str]:
    """Claim one free GPU per process (locks held until this process exits) and return their CUDA ids."""
    from ramoe.device import claim_gpu

    count = torch.cuda.device_count()
    if count < processes:
        raise RuntimeError(
            f"finetune.processes = {processes} needs one GPU per process, but {count} GPUs are visible. "
            "Lower finetune.processes or give the job more GPUs."
        )
    identities = _visible_gpu_ids(count)
    return [identities[claim_gpu(count)] for _ in range(processes)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_finetune(arguments: Mapping, *, processes: int, device: str = "auto", threads: int = 1) -> list[dict]:
    """Run ``finetune_task_language(**arguments)`` in ``processes`` DDP workers through torchrun.

    ``arguments`` are the keyword arguments of ``ramoe.training.run.finetune_task_language``
    (JSON-serializable). On CUDA each worker gets one claimed GPU; on CPUs (``device: cpu`` or
    no CUDA) the workers use gloo and share ``threads`` between them. The workers' output is
    logged line by line. Returns the metric records rank 0 wrote to ``metrics.jsonl``.
    """
    if processes < 2:
        raise ValueError(f"launch_finetune needs at least 2 processes, got {processes}.")
    if device.startswith("cuda:"):
        raise ValueError(
            f"device = {device!r} pins one GPU, but finetune.processes = {processes} needs one per process. "
            "Set device: auto or cuda."
        )
    environment = dict(os.environ)
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if device == "cuda" and not use_cuda:
        raise RuntimeError("device = 'cuda' but CUDA is not available here. Set device: auto or cpu.")
    if use_cuda:
        environment["CUDA_VISIBLE_DEVICES"] = ",".join(_claim_gpus(processes))
    worker_threads = max(1, threads // processes)
    environment["OMP_NUM_THREADS"] = str(worker_threads)

    with tempfile.TemporaryDirectory(prefix="ramoe-ddp-") as folder:
        spec_path = Path(folder) / "arguments.json"
        spec = {**arguments, "device": "cuda" if use_cuda else "cpu", "threads": worker_threads}
        spec_path.write_text(json.dumps(spec, default=str), encoding="utf-8")
        # NOTE: all processes start on this machine (static rendezvous on a free loopback port).
        # Training across machines needs torchrun started on every node, which this does not do.
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={processes}",
            "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
            "-m", "ramoe.training.distributed", str(spec_path),
        ]
        log.info("launching %d fine-tuning processes (%s): %s", processes, "NCCL" if use_cuda else "gloo",
                 " ".join(command))
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=environment) as process:
            for line in process.stdout:
                log.info("%s", line.rstrip())
        if process.returncode != 0:
            raise RuntimeError(
                f"distributed fine-tuning failed: torchrun exited with status {process.returncode}. "
                "The workers' errors are in the lines above."
            )
    metrics = Path(arguments["output_dir"]) / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line]


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of one torchrun worker: join the process group and fine-tune with the saved arguments."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m torch.distributed.run ... -m ramoe.training.distributed ARGUMENTS.json")
    arguments = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = arguments["device"] == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    logging.basicConfig(
        level=logging.INFO if dist.get_rank() == 0 else logging.WARNING,
        format=f"rank {dist.get_rank()} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    arguments["device"] = f"cuda:{local_rank}" if use_cuda else "cpu"
    from ramoe.training.run import finetune_in_process

    try:
        finetune_in_process(**arguments)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
