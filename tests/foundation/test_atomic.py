"""Atomic writes: nothing half-written is left looking complete, nothing existing is overwritten."""
from __future__ import annotations

import os

import pytest
import torch

from netshrink.atomic import atomic_dir, atomic_file
from netshrink.errors import NetshrinkError


def test_atomic_file_has_normal_permissions_and_refuses_existing(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_file(target) as tmp:
        tmp.write_text("done")
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # mkstemp's 0600 would hide exports from other users
    with pytest.raises(NetshrinkError, match="already exists"):
        with atomic_file(target):
            pass
    assert target.read_text() == "done"


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(OSError):
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "a").write_text("x")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_zoo_loads_a_netshrink_checkpoint_folder(tmp_path, digit_cnn):
    from netshrink import zoo
    from netshrink.export.checkpoint import save_checkpoint

    path = save_checkpoint(digit_cnn.model, tmp_path / "ckpt", base="digit-cnn")
    entry = zoo.load(str(path))
    x = digit_cnn.example_inputs(batch=4)[0]
    with torch.inference_mode():
        assert torch.equal(entry.model(x), digit_cnn.model(x))
