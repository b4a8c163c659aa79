"""Artifacts get ordinary permissions (0666/0777 less the umask), so a bundle or run folder is readable
by another user, e.g. a container serving the bundle (issue #19, item 5)."""

import json
import os
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest

from distill.core import artifacts

# (umask, file mode, folder mode) the kernel gives open(..., 0o666) and mkdir(..., 0o777)
UMASKS = [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]


@contextmanager
def umask(value: int):
    """Run the block under process umask ``value``, restoring the old one after."""
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_with_every_writer(root: Path) -> tuple[list[Path], list[Path]]:
    """Call each writer of ``distill.core.artifacts`` into new folders under ``root``; returns the
    (files, folders) they created."""
    import pyarrow as pa

    files = []
    artifacts.atomic_write_bytes(root / "bytes" / "deep" / "a.bin", b"x")
    files.append(root / "bytes" / "deep" / "a.bin")
    artifacts.write_json(root / "json" / "metrics.json", {"a": 1})
    files.append(root / "json" / "metrics.json")
    artifacts.write_text(root / "text" / "report.md", "# report\n")
    files.append(root / "text" / "report.md")
    artifacts.write_config(root / "config", "export", {"k": 1}, {"name": "r"})
    files.append(root / "config" / artifacts.CONFIG_FILE)
    artifacts.write_recipe(root / "recipe" / "recipe.yaml", {"name": "r"})
    files.append(root / "recipe" / "recipe.yaml")
    table = pa.table({"x": [1, 2, 3]})
    artifacts.write_parquet(root / "parquet" / "t.parquet", table)
    files.append(root / "parquet" / "t.parquet")
    shards = artifacts.ShardWriter(root / "shards" / "parts", root / "shards" / "shards.json", table.schema, 2)
    shards.add(table)
    shards.close()
    files += [root / "shards" / "shards.json", *(root / "shards" / "parts").glob("part-*.parquet")]
    folders = [root / d for d in ("bytes", "bytes/deep", "json", "text", "config", "recipe", "parquet", "shards")]
    return files, [*folders, root / "shards" / "parts"]


@pytest.mark.parametrize("mask, file_mode, folder_mode", UMASKS, ids=["umask022", "umask077"])
def test_every_writer_honours_the_umask(tmp_path, mask, file_mode, folder_mode):
    with umask(mask):
        files, folders = write_with_every_writer(tmp_path)
    assert len(files) == 8  # every writer, and the shard writer committed its shard
    assert {f.name: oct(mode(f)) for f in files} == {f.name: oct(file_mode) for f in files}
    assert {str(d): oct(mode(d)) for d in folders} == {str(d): oct(folder_mode) for d in folders}
    assert not [p for p in tmp_path.rglob("*.tmp")]  # no temp file left behind


def test_a_rewrite_replaces_a_private_file_with_an_ordinary_one(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("{}")
    target.chmod(0o600)
    with umask(0o022):
        artifacts.write_json(target, {"a": 1})
    assert mode(target) == 0o644 and json.loads(target.read_text()) == {"a": 1}


def test_a_failed_write_leaves_no_temp_file_and_names_it_for_the_cli(tmp_path, monkeypatch):
    seen = []

    def failing_replace(src, dst):
        seen.append(Path(src).name)
        raise OSError(28, "No space left on device", src)

    monkeypatch.setattr(artifacts.os, "replace", failing_replace)
    with pytest.raises(OSError):
        artifacts.write_text(tmp_path / "report.md", "text")
    # the CLI names the folder, not the temp file, for a name like this (distill.cli._guard)
    assert seen[0].startswith(".report.md.") and seen[0].endswith(".tmp")
    assert list(tmp_path.iterdir()) == []


def test_an_export_bundle_is_world_readable(tiny_student, tmp_path):
    """The device bundle as the export stage assembles it: every file readable by others, every folder
    enterable, and the files distill writes itself exactly 0644 under umask 022."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.export.bundle import FP32_FILE, assemble_bundle
    from distill.export.onnx_export import PADDING_SIDE, export_decoder

    model = AutoModelForCausalLM.from_pretrained(tiny_student).eval()
    tok = AutoTokenizer.from_pretrained(tiny_student)
    variants, bundle = tmp_path / "variants", tmp_path / "export" / "bundle"
    with umask(0o022):
        layout = export_decoder(model, variants / FP32_FILE)
        assemble_bundle(
            variants,
            bundle,
            FP32_FILE,
            tok,
            model.config,
            max_new_tokens=8,
            fmt="rationale",
            padding_side=PADDING_SIDE[layout],
            quant_config={"preset": "fp32"},
            card="# card\n",
        )
        artifacts.write_config(bundle, "export", {"k": 1}, {"name": "r"})  # as the export stage does
        artifacts.write_json(bundle.parent / "metrics.json", {"a": 1})
    ours = ["genai_config.json", "README.md", "quantization_config.json", "distill_generation.json"]
    ours.append(artifacts.CONFIG_FILE)
    assert {n: oct(mode(bundle / n)) for n in ours} == {n: "0o644" for n in ours}
    assert mode(bundle.parent / "metrics.json") == 0o644
    unreadable = [str(p) for p in bundle.rglob("*") if p.is_file() and mode(p) & 0o044 != 0o044]
    assert unreadable == []
    assert {FP32_FILE, "tokenizer.json", "distill_runtime.py"} <= {p.name for p in bundle.iterdir()}
    for folder in [bundle, *(p for p in bundle.rglob("*") if p.is_dir())]:
        assert mode(folder) & 0o055 == 0o055, folder
