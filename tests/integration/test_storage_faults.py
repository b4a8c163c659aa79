"""A full disk and a read-only output folder, for real: a tiny tmpfs in a private mount namespace
(`unshare -Urm`, no root needed). One clear line and exit code 2; committed shards stay valid;
after space is freed the same command finishes with the same dataset as an undisturbed run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.integration


def _can_mount(tmp_path: Path) -> bool:
    if not shutil.which("unshare"):
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    r = subprocess.run(["unshare", "-Urm", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)])
    return r.returncode == 0


def _rows(run: Path) -> list:
    out = []
    for split in ("train", "eval"):
        out += pq.read_table(run / "generate" / "dataset" / f"{split}.parquet").to_pylist()
    return sorted((r["id"], r["rationale"], r["pred"]) for r in out)


def test_full_disk_then_read_only(tmp_path, tiny_teacher, tiny_task_cfg):
    if not _can_mount(tmp_path):
        pytest.skip("this machine cannot mount a tmpfs in a user namespace (unshare -Urm)")
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    teacher = {
        "model": f"hf:{tiny_teacher}",
        "dtype": "float32",
        "max_new_tokens": 24,
        "executor": "local",
        "keep": "all",
        "batch_size": 4,
        "shard_rows": 4,
    }
    task = {**tiny_task_cfg.model_dump(), "train_size": 40}
    recipe = {"name": "r", "output_dir": str(mnt / "runs"), "cache": str(tmp_path / "cache.sqlite")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**recipe, "task": task, "teacher": teacher}))
    # The undisturbed reference, on the real disk (and it fills the completion cache: the faults
    # below are about storage, not about paying the teacher again).
    ref = {**recipe, "output_dir": str(tmp_path / "ref"), "cache": str(tmp_path / "ref-cache.sqlite")}
    (tmp_path / "ref.yaml").write_text(yaml.safe_dump({**ref, "task": task, "teacher": teacher}))
    py = f"{sys.executable} -m distill generate"
    script = f"""
        mount -t tmpfs -o size=64k tmpfs {mnt}
        {py} {tmp_path}/r.yaml > {out}/full.log 2>&1; echo $? > {out}/full.rc
        find {mnt} -name '*.tmp' > {out}/leftovers.txt
        cp -a {mnt}/runs {out}/after_full
        mount -o remount,size=4m tmpfs {mnt}
        {py} {tmp_path}/r.yaml > {out}/freed.log 2>&1; echo $? > {out}/freed.rc
        cp -a {mnt}/runs {out}/final
        mount -o remount,ro tmpfs {mnt}
        {py} {tmp_path}/r.yaml --force > {out}/ro.log 2>&1; echo $? > {out}/ro.rc
    """
    assert subprocess.run([sys.executable, "-m", "distill", "generate", str(tmp_path / "ref.yaml")]).returncode == 0
    subprocess.run(["unshare", "-Urm", "sh", "-c", script], check=True, timeout=600, env=os.environ)

    for case, reason in (("full", "No space left on device"), ("ro", "Read-only file system")):
        log = (out / f"{case}.log").read_text()
        errors = [ln for ln in log.splitlines() if ln.startswith("error:")]
        assert (out / f"{case}.rc").read_text().strip() == "2", log
        assert len(errors) == 1 and reason in errors[0] and "Traceback" not in log, log
    assert (out / "leftovers.txt").read_text() == ""  # no temp file left behind
    # What the full disk left: only complete shards, each listed in the manifest and intact.
    work = next((out / "after_full" / "r").glob(".generate.work-*"))
    from distill.core.artifacts import ShardWriter
    from distill.teachers.rows import ROW_SCHEMA

    committed = list(ShardWriter(work / "shards", work / "shards.json", ROW_SCHEMA, 4).resume())
    assert 0 < sum(t.num_rows for t in committed) < 46  # it failed part-way, after some commits
    assert {p.name for p in (work / "shards").iterdir()} == {f"part-{i:05d}.parquet" for i in range(len(committed))}
    assert not (out / "after_full" / "r" / "generate").exists()  # the stage never half-appeared
    # Space freed, same command: the run finishes and equals the undisturbed one.
    assert (out / "freed.rc").read_text().strip() == "0", (out / "freed.log").read_text()
    assert _rows(out / "final" / "r") == _rows(tmp_path / "ref" / "r")
