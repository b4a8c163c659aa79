"""Students on Ray Train (student.workers): two CPU workers train the model one process trains, a worker
SIGKILLed mid-run is replaced from the last checkpoint, and a run that died resumes from storage."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.config import Recipe, StudentConfig
from distill.students.data import tokenize_example
from distill.students.trainer import train

pytestmark = [pytest.mark.integration, pytest.mark.cluster]  # `make test-cluster`

# One process: 4 micro-batches of 1 per step; two workers: 2 each (2 workers x 1 x 2 = batch_size 4).
STUDENT = {
    "epochs": 2,
    "lr": 3e-3,
    "batch_size": 4,
    "micro_batch_size": 1,
    "seed": 3,
    "precision": "fp32",
    "save_every": 2,
    "max_length": 64,
}


def _weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _assert_same_model(a, b, losses_a, losses_b):
    wa, wb = _weights(a), _weights(b)
    assert (wa - wb).abs().max().item() <= 1e-4 * wa.abs().max().item()
    assert [e["step"] for e in losses_a] == [e["step"] for e in losses_b]
    for x, y in zip(losses_a, losses_b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"])


def _examples(tok):  # different lengths: the shards pad differently from the whole batch
    return [
        tokenize_example(tok, f"Q: {i} + {i * 7} =", f" {i} plus {i * 7}" * (1 + i % 3) + f" is {8 * i}.", 64)
        for i in range(10)
    ]


@pytest.fixture(scope="module")
def one_process(tiny_student):
    tok = AutoTokenizer.from_pretrained(tiny_student)
    model = AutoModelForCausalLM.from_pretrained(tiny_student)
    result = train(model, _examples(tok), StudentConfig(model="x", **STUDENT), tok.pad_token_id)
    return model, result


def _on_workers(tiny_student, storage, **settings):
    from distill.students.distributed import WorkerSettings, train_on_workers

    tok = AutoTokenizer.from_pretrained(tiny_student)
    model = AutoModelForCausalLM.from_pretrained(tiny_student)
    cfg = StudentConfig(model="x", **STUDENT)
    done = train_on_workers(
        model, _examples(tok), cfg, tok.pad_token_id, WorkerSettings(2, str(storage), "run", **settings)
    )
    return model, done


def test_train_stage_on_two_workers_trains_the_one_process_model(tiny_student, tmp_path, ray_cluster):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distill.stages.train import train_stage

    gen = tmp_path / "generate" / "dataset"
    gen.mkdir(parents=True)
    rows = [
        {"question": f"{i} + {i} =", "rationale": f"{i} and {i} more" * (1 + i % 2), "gold": str(2 * i), "pred": "0"}
        for i in range(14)
    ]
    pq.write_table(pa.Table.from_pylist(rows), gen / "train.parquet")
    results = []
    for workers in (1, 2):
        student = {**STUDENT, "model": f"hf:{tiny_student}", "workers": workers, "eval_max_new_tokens": 4}
        student["validation"] = {"dev_size": 4, "every": 2}  # rank 0 scores the dev split for both workers
        recipe = Recipe.model_validate({"task": {"answer_type": "number"}, "student": student})
        res = train_stage(recipe, tmp_path / "generate", tmp_path / f"train-{workers}", tmp_path / f"work-{workers}")
        results.append((AutoModelForCausalLM.from_pretrained(res.model_dir), res))
    (one, a), (two, b) = results
    _assert_same_model(one, two, *[json.loads((r.dir / "loss.json").read_text()) for r in (a, b)])
    assert a.metrics["steps"] == b.metrics["steps"] == 6 and a.metrics["tokens"] == b.metrics["tokens"]
    assert a.metrics["best_step"] == b.metrics["best_step"]
    assert abs(a.metrics["best_dev_loss"] - b.metrics["best_dev_loss"]) < 1e-4
    assert (tmp_path / "work-2" / "ray_train" / "checkpoint_manager_snapshot.json").exists()


def test_a_lost_worker_is_replaced_from_the_last_checkpoint_and_a_dead_run_resumes_from_storage(
    tiny_student, tmp_path, ray_cluster, one_process, monkeypatch
):
    import ray.train

    # Real process deaths (SIGKILL, once each): rank 1 after step 3, then rank 0 after step 5.
    monkeypatch.setenv("DISTILL_TRAIN_FAULT", "kill:1:3,kill:0:5")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # the controller notices deaths sooner
    with pytest.raises(ray.train.TrainingFailedError):  # one restart allowed: the second death ends the run
        _on_workers(tiny_student, tmp_path, max_failures=1)
    assert (tmp_path / "run" / "fault-1-3.done").exists() and (tmp_path / "run" / "fault-0-5.done").exists()
    # Rank 1's death was survived: the replaced group went on from step 2 and wrote step 4's checkpoint.
    model, done = _on_workers(tiny_student, tmp_path)  # the same storage and name: the run started again
    assert done.resumed_from == 4
    ref_model, ref = one_process
    assert done.result.steps == ref.steps == 6
    _assert_same_model(ref_model, model, ref.losses, done.result.losses)
