"""Atomic file sets: readers see the old set or the new one, never a mix; keys are private."""

from __future__ import annotations

import os
import stat

import pytest

from runtime.certificates import files
from runtime.certificates.files import publish_files, write_file_atomic


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


SET_ONE = {"tls.crt": (b"cert-1", 0o644), "tls.key": (b"key-1", 0o600)}
SET_TWO = {"tls.crt": (b"cert-2", 0o644), "tls.key": (b"key-2", 0o600)}


def test_publish_writes_modes_and_a_private_directory(tmp_path):
    target = tmp_path / "certs"
    paths = publish_files(target, SET_ONE)
    assert paths["tls.key"].read_bytes() == b"key-1"
    assert mode(paths["tls.key"]) == 0o600
    assert mode(paths["tls.crt"]) == 0o644
    assert mode(target) == 0o700


def test_publish_tightens_an_existing_loose_directory(tmp_path):
    target = tmp_path / "certs"
    target.mkdir(mode=0o755)
    target.chmod(0o755)
    publish_files(target, SET_ONE)
    assert mode(target) == 0o700


def test_a_new_version_replaces_the_whole_set_and_cleans_up(tmp_path):
    publish_files(tmp_path, SET_ONE)
    publish_files(tmp_path, SET_TWO)
    assert (tmp_path / "tls.crt").read_bytes() == b"cert-2"
    assert (tmp_path / "tls.key").read_bytes() == b"key-2"
    versions = [p for p in tmp_path.iterdir() if p.name.startswith("..v")]
    assert len(versions) == 1, "old versions are removed"


def test_a_failure_half_way_leaves_the_previous_set(tmp_path, monkeypatch):
    publish_files(tmp_path, SET_ONE)
    real_write = files._write_new
    calls = []

    def fail_on_second_file(path, data, mode):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_write(path, data, mode)

    monkeypatch.setattr(files, "_write_new", fail_on_second_file)
    with pytest.raises(OSError, match="No space left"):
        publish_files(tmp_path, SET_TWO)
    assert (tmp_path / "tls.crt").read_bytes() == b"cert-1"
    assert (tmp_path / "tls.key").read_bytes() == b"key-1"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("..v")) == [
        os.readlink(tmp_path / files.DATA_LINK)
    ], "the half-written version is removed"


def test_names_dropped_from_the_set_disappear(tmp_path):
    publish_files(tmp_path, {**SET_ONE, "tls.pem": (b"both", 0o600)})
    publish_files(tmp_path, {"ca.crt": (b"ca", 0o644)})
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("..")) == ["ca.crt"]


def test_plain_files_from_an_older_loader_are_replaced(tmp_path):
    (tmp_path / "tls.crt").write_bytes(b"legacy")
    publish_files(tmp_path, SET_ONE)
    assert (tmp_path / "tls.crt").read_bytes() == b"cert-1"


def test_write_file_atomic_sets_the_mode_even_under_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        path = write_file_atomic(tmp_path / "ca.key", b"k", 0o600)
    finally:
        os.umask(old)
    assert mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["ca.key"], "no temporary file left behind"
