import hashlib
import json
import os

import pytest

from distill.core.errors import DistillError
from distill.core.sources import file_digest, parse_source, resolve_model


def test_file_digest_is_remembered_and_invalidated_by_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"weights v1")
    v1 = hashlib.sha256(b"weights v1").hexdigest()
    assert file_digest(f) == v1
    (memo,) = (tmp_path / "cache" / "digests").iterdir()
    assert json.loads(memo.read_text()) == {"size": 10, "mtime_ns": f.stat().st_mtime_ns, "sha256": v1}
    # Remembered: while size and mtime are unchanged the memo answers and the file is not read again.
    memo.write_text(json.dumps({"size": 10, "mtime_ns": f.stat().st_mtime_ns, "sha256": "0" * 64}))
    assert file_digest(f) == "0" * 64
    f.write_bytes(b"weights v2 longer")
    assert file_digest(f) == hashlib.sha256(b"weights v2 longer").hexdigest()
    st = f.stat()
    f.write_bytes(b"weights v3 longer")  # same size: the mtime still tells
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert file_digest(f) == hashlib.sha256(b"weights v3 longer").hexdigest()


def test_sources_parse_and_fail_clearly(tmp_path):
    assert parse_source("gguf:/a/b.gguf") == ("gguf", "/a/b.gguf")
    assert parse_source("/plain/folder") == ("hf", "/plain/folder")
    with pytest.raises(DistillError, match="unknown embedded model"):
        resolve_model("embedded:nope")
    with pytest.raises(DistillError, match="does not exist"):
        resolve_model(f"gguf:{tmp_path / 'missing.gguf'}")
