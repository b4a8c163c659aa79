import hashlib
import os

import pytest

from distill.core.errors import DistillError
from distill.core.sources import file_digest, parse_source, resolve_model


def test_file_digest_is_remembered_and_invalidated_by_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"weights v1")
    assert file_digest(f) == hashlib.sha256(b"weights v1").hexdigest()
    assert len(list((tmp_path / "cache" / "digests").iterdir())) == 1
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
