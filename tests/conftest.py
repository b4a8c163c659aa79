import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # distill itself, before any install
from distill.core.env import set_env_defaults  # noqa: E402

set_env_defaults()  # before torch is imported anywhere: one OpenMP thread per process
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> Path:
    from tiny import build_model

    return build_model(tmp_path_factory.mktemp("student"), "llama", seed=2)


@pytest.fixture(scope="session")
def tiny_task_cfg():
    from distill.config import TaskConfig

    return TaskConfig(
        name="chain_sum", params={"min_terms": 2, "max_terms": 2, "max_digits": 1}, train_size=12, eval_size=6
    )


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_task_cfg) -> Path:
    """A tiny model fitted to answer most of the tiny task's problems (real weights, no download)."""
    from tiny import train_tiny_teacher

    from distill.core.problems import load_problems

    train, evals = load_problems(tiny_task_cfg)
    # Fit on part of each split so the teacher is right on some problems and wrong on others.
    return train_tiny_teacher(tmp_path_factory.mktemp("teacher"), train[:8] + evals[:4], epochs=80)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (starting one costs seconds)."""
    import ray

    from distill.core.executor import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def four_layer(tmp_path_factory) -> Path:
    """A tiny random four-layer llama: room to keep a subset of its layers."""
    from tiny import build_model

    return build_model(tmp_path_factory.mktemp("four"), "llama", seed=5, layers=4)
