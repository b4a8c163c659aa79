"""Students trained data-parallel on Ray Train: the trainer's own loop on N workers, one model.

``train_on_workers`` runs ``students.trainer.train`` in each worker of a Ray Train ``TorchTrainer``
(gloo on CPU, NCCL on CUDA). Every worker takes a disjoint shard of each global batch; the shards'
gradients are summed over the process group before each optimizer step, so every worker holds the
weights a single process reaches on the same batches (same seed, data order and schedule), within
float tolerance. Rank 0 writes the trainer's resumable checkpoint and hands it to Ray Train
(``ray.train.report``), which keeps it in ``storage_path``: a lost worker restarts the group from it
(``max_failures`` times), and a new run with the same ``storage_path`` and ``name`` continues from it.

The all-reduce is the trainer's own (one flattened sum per step) rather than a ``DistributedDataParallel``
wrapper: the loss is computed through the decoder and the LM head apart (``forward_loss``), which DDP's
reducer does not see, and a shard may take more, fewer or no micro-batches than another.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

from distill.core.errors import DistillError
from distill.students.trainer import CHECKPOINT_RNG, Replica, TrainResult, train

FAULT_ENV = "DISTILL_TRAIN_FAULT"  # tests: "kill:<rank>:<step>[,...]" SIGKILLs that worker once, after that step
RESULT_FILE = "result.json"
FINAL_MODEL = "model.safetensors"


@dataclass
class WorkerSettings:
    """Where and how a data-parallel run goes: ``workers`` Ray Train workers, checkpoints kept in
    ``storage_path``/``name`` (a folder every node reaches when the cluster has several), at most
    ``max_failures`` restarts of the worker group; ``use_gpu`` None = CUDA when the driver has it."""

    workers: int
    storage_path: str
    name: str
    max_failures: int = 3
    use_gpu: bool | None = None
    resources_per_worker: dict | None = None  # default: one CPU (one GPU with use_gpu)


@dataclass
class WorkersResult:
    """Rank 0's ``TrainResult``, and the step the last worker group started from (0: the beginning)."""

    result: TrainResult
    resumed_from: int


def train_on_workers(
    model, examples: list[dict], cfg, pad_id: int, settings: WorkerSettings, dev=None, kd=None
) -> WorkersResult:
    """Train ``model`` (in place) on ``settings.workers`` Ray Train workers; returns rank 0's result,
    equal to ``students.trainer.train``'s for the same ``cfg`` within float tolerance.

    Resumes from the last checkpoint in ``settings.storage_path``/``settings.name`` when there is one.
    """
    import ray
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from safetensors.torch import load_model

    from distill.core.executor import init_ray

    if settings.workers < 1:
        raise DistillError(f"student.workers must be at least 1, got {settings.workers}")
    use_gpu = torch.cuda.is_available() if settings.use_gpu is None else settings.use_gpu
    init_ray()
    storage = Path(settings.storage_path).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "model": ray.put(model.to("cpu")),
        "examples": ray.put(examples),
        "cfg": cfg,
        "pad_id": pad_id,
        "dev": dev,
        "kd": kd,
        "fault": _fault(storage / settings.name),
    }
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            # (1, N): elastic, so a group that lost a node starts again on the workers that fit (the model
            # does not depend on the worker count) instead of waiting forever for the lost node's CPUs.
            num_workers=(1, settings.workers) if settings.workers > 1 else settings.workers,
            use_gpu=use_gpu,
            resources_per_worker=settings.resources_per_worker,
            placement_strategy="PACK" if use_gpu else "SPREAD",  # CPU: one worker per node first
        ),
        run_config=RunConfig(
            name=settings.name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise DistillError(f"Ray Train finished without the trained student in {storage / settings.name}")
    with result.checkpoint.as_directory() as folder:
        load_model(model, str(Path(folder) / FINAL_MODEL))
        done = json.loads((Path(folder) / RESULT_FILE).read_text())
    model.eval()
    model.config.use_cache = True
    return WorkersResult(TrainResult(**done["result"]), done["resumed_from"])


def _fault(run_folder: Path) -> list[dict]:
    """The test-facing faults of ``DISTILL_TRAIN_FAULT`` (``kill:<rank>:<step>``, comma-separated), each
    done once per run folder."""
    faults = []
    for spec in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        _, rank, step = spec.split(":")
        faults.append({"rank": int(rank), "step": int(step), "marker": str(run_folder / f"fault-{rank}-{step}.done")})
    return faults


def _worker_loop(config: dict) -> None:
    """One Ray Train worker: the trainer's loop on this rank's shards, resumed from Ray Train's checkpoint."""
    import ray
    import ray.train
    from ray.train.torch import get_device
    from safetensors.torch import save_model

    from distill.core.env import set_env_defaults

    set_env_defaults()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device()
    model = ray.get(config["model"]).to(device)
    local = Path(tempfile.mkdtemp(prefix="distill-train-"))  # this worker's copy of the checkpoint
    try:
        work = local / "checkpoint"
        restored, resumed_from = ray.train.get_checkpoint(), 0
        if restored is not None:
            with restored.as_directory() as folder:
                if (Path(folder) / RESULT_FILE).exists():
                    return  # a finished run: its last checkpoint holds the result already
                shutil.copytree(folder, work)
            resumed_from = json.loads((work / CHECKPOINT_RNG).read_text())["position"]["step"]
        replica = _replica(rank, world, device)
        result = train(
            model,
            ray.get(config["examples"]),
            config["cfg"],
            config["pad_id"],
            checkpoint_dir=work,
            dev=config["dev"],
            on_log=_fault_hook(config["fault"], rank),
            kd=config["kd"],
            replica=replica,
        )
        final = None
        if rank == 0:
            final = local / "final"
            final.mkdir()
            save_model(model, str(final / FINAL_MODEL))
            (final / RESULT_FILE).write_text(json.dumps({"result": result.__dict__, "resumed_from": resumed_from}))
        ray.train.report(
            {"step": result.steps, "done": True},
            checkpoint=ray.train.Checkpoint.from_directory(str(final)) if final else None,
        )
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _replica(rank: int, world: int, device) -> Replica:
    """The hooks that keep ``world`` copies of the loop one model over torch.distributed's process group."""
    import ray.train
    import torch
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    def reduce_gradients(model) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for p, g in zip(params, _unflatten_dense_tensors(flat, grads), strict=True):
            p.grad = g

    def sum_step(loss: float, kd: float | None, tokens: int):
        t = torch.tensor([loss, kd or 0.0, float(tokens), float(kd is not None)], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        loss, kd_sum, tokens, has_kd = t.tolist()
        return loss, (kd_sum if has_kd else None), int(round(tokens))

    def share(obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
        return box[0]

    def checkpointed(folder: Path | None) -> None:
        # Every rank reports (a barrier in Ray Train); rank 0's folder is copied to storage before it returns.
        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if folder is not None else None
        ray.train.report({"checkpoint": True}, checkpoint=checkpoint)
        if folder is not None:  # and committed before training goes on: a worker lost next step resumes here
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    return Replica(rank, world, reduce_gradients, sum_step, share, checkpointed)


def _fault_hook(faults: list[dict], rank: int):
    """``on_log`` that SIGKILLs this worker after a fault's step, once each (tests: a real process death)."""
    mine = [f for f in faults if f["rank"] == rank]
    if not mine:
        return None

    def on_log(step: int, metrics: dict) -> None:
        for fault in mine:
            marker = Path(fault["marker"])
            if step == fault["step"] and not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)

    return on_log
