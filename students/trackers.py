"""Training metrics streamed to the trackers users already run, through those projects' own libraries
(optional extras: ``pip install 'distill[trackers]'``).

- ``tensorboard``: event files in ``<run>/tensorboard/train-<time>`` (``torch.utils.tensorboard.SummaryWriter``;
  ``tensorboard --logdir <run>/tensorboard``), one folder per training attempt.
- ``mlflow``: a run in ``$MLFLOW_TRACKING_URI`` when set (your server), else a local store in
  ``<run>/mlruns`` (``mlflow ui --backend-store-uri <run>/mlruns``).

Every tracker gets the same scalars: ``train/loss`` and ``train/lr`` per optimizer step, ``dev/loss``
and ``dev/accuracy`` per dev evaluation.
"""

from __future__ import annotations

import os
from pathlib import Path

from distill.core.errors import DistillError

EXTRA = "pip install 'distill[trackers]' (or the tracker's own package)"


class TensorBoardTracker:
    def __init__(self, folder: Path, params: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise DistillError("student.report_to=tensorboard needs the tensorboard package", EXTRA) from None
        self.folder = folder
        self.writer = SummaryWriter(str(folder))
        self.writer.add_text("params", "\n".join(f"{k}: {v}" for k, v in sorted(params.items())))

    def log(self, step: int, metrics: dict) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    def __init__(self, store: Path, run_name: str, params: dict):
        try:
            import mlflow
        except ImportError:
            raise DistillError("student.report_to=mlflow needs the mlflow package", EXTRA) from None
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # no server named: a store in the run folder, readable by `mlflow ui`
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = store.resolve().as_uri()
        self.uri = uri
        self.client = mlflow.tracking.MlflowClient(uri)
        experiment = self.client.get_experiment_by_name("distill")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("distill")
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        for k, v in sorted(params.items()):
            self.client.log_param(self.run_id, k, str(v)[:500])

    def log(self, step: int, metrics: dict) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Trackers:
    """The trackers a recipe names, as one ``log(step, metrics)`` / ``close()``."""

    def __init__(self, names: list[str], run_dir: Path, run_name: str, params: dict):
        import time

        self.trackers = []
        for name in names:
            if name == "tensorboard":
                folder = run_dir / "tensorboard" / time.strftime("train-%Y%m%d-%H%M%S")
                self.trackers.append(TensorBoardTracker(folder, params))
            elif name == "mlflow":
                self.trackers.append(MLflowTracker(run_dir / "mlruns", run_name, params))
            else:
                raise DistillError(f"unknown tracker {name!r}", "set student.report_to to tensorboard and/or mlflow")

    def log(self, step: int, metrics: dict) -> None:
        for t in self.trackers:
            t.log(step, metrics)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
