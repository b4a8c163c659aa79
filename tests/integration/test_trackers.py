"""Train and dev metrics reach TensorBoard event files and a local MLflow store, read back through
those projects' own readers."""

import json

import pytest
from tiny import write_recipe

pytestmark = pytest.mark.integration


def test_metrics_stream_to_tensorboard_and_mlflow(tmp_path, tiny_teacher, tiny_student, tiny_task_cfg, monkeypatch):
    import distill

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    f = write_recipe(
        tmp_path,
        "tracked",
        tiny_task_cfg,
        teacher={"model": f"hf:{tiny_teacher}", "max_new_tokens": 24, "executor": "local", "dtype": "float32"},
        student={
            "model": f"hf:{tiny_student}",
            "epochs": 2,
            "lr": 3e-3,
            "batch_size": 2,
            "micro_batch_size": 2,
            "max_length": 128,
            "eval_max_new_tokens": 8,
            "validation": {"dev_size": 2, "every": 2},
            "report_to": ["tensorboard", "mlflow"],
        },
    )
    distill.generate(f)
    distill.train(f)
    run = tmp_path / "runs" / "tracked"
    losses = json.loads((run / "train" / "loss.json").read_text())
    dev = json.loads((run / "train" / "dev.json").read_text())
    want_loss = [(x["step"] + 1, x["loss"]) for x in losses]
    want_dev = [(d["step"], d["dev_accuracy"]) for d in dev]

    def same(got, want, rel=1e-6):
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=rel)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (folder,) = (run / "tensorboard").iterdir()
    events = EventAccumulator(str(folder))
    events.Reload()
    same([(e.step, e.value) for e in events.Scalars("train/loss")], want_loss)  # float32 in the event file
    same([(e.step, e.value) for e in events.Scalars("dev/accuracy")], want_dev)

    from mlflow.tracking import MlflowClient

    client = MlflowClient((run / "mlruns").resolve().as_uri())
    (mlrun,) = client.search_runs([client.get_experiment_by_name("distill").experiment_id])
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "tracked"
    history = sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "train/loss"))
    same(history, want_loss)
    dev_history = sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "dev/accuracy"))
    same(dev_history, want_dev)
    assert mlrun.data.params["student.lr"] == "0.003"
    # Where metrics are watched does not change what is trained: the stage hash ignores it.
    from distill.pipeline import stage_hash

    plain = distill.load_recipe(f, ["student.report_to=[]"])
    assert stage_hash(plain, "train") == stage_hash(distill.load_recipe(f), "train")


def test_a_tracker_without_its_package_is_one_line(tmp_path, monkeypatch):
    import builtins

    from distill.core.errors import DistillError
    from distill.students.trackers import Trackers

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with pytest.raises(DistillError, match=r"^student.report_to=mlflow needs the mlflow package — pip install"):
        Trackers(["mlflow"], tmp_path, "x", {})
