"""The CLI: every command has --help; bad input gets one line naming the thing and place, exit 2, no traceback."""
from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch

from netshrink.cli import build_parser, main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "netshrink.cli", *args], capture_output=True, text=True, timeout=300)


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"info", "eval", "bench", "demo"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: netshrink " + name in capsys.readouterr().out


def _one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("netshrink: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_unknown_model_name():
    _one_line_error(run_cli("eval", "resnet9000"), "resnet9000", "unknown model")


def test_missing_and_unreadable_weights_file(tmp_path):
    _one_line_error(run_cli("eval", "netshrink.zoo.builtin:DigitCNN", "--weights", str(tmp_path / "nope.pth")),
                    "nope.pth", "not found")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    _one_line_error(run_cli("eval", "netshrink.zoo.builtin:DigitCNN", "--weights", str(empty)), "empty.pth", "empty")


def test_corrupt_and_truncated_checkpoints(tmp_path, digit_cnn):
    good = tmp_path / "good.pth"
    torch.save(digit_cnn.model.state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _one_line_error(run_cli("eval", "netshrink.zoo.builtin:DigitCNN", "--weights", str(truncated)), "truncated.pth", "corrupt or truncated")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all")
    _one_line_error(run_cli("eval", "netshrink.zoo.builtin:DigitCNN", "--weights", str(garbage)), "garbage.safetensors")


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weight": Evil()}, path)
    result = run_cli("eval", "netshrink.zoo.builtin:DigitCNN", "--weights", str(path))
    _one_line_error(result, "evil.pth", "pickle")
    assert "this must never run" not in result.stdout


def test_weights_for_another_architecture(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3, 3)}, path)
    _one_line_error(run_cli("eval", "netshrink.zoo.builtin:DigitCNN", "--weights", str(path)), "other.pth", "do not match")


def test_wrong_input_shape():
    _one_line_error(run_cli("bench", "digit-cnn", "--input-shape", "3,32,32", "--rounds", "1"), "digit-cnn", "3, 32, 32")


def test_debug_shows_traceback():
    result = run_cli("--debug", "eval", "resnet9000")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_demo_refuses_existing_output_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    _one_line_error(run_cli("demo", "--out", str(tmp_path)), str(tmp_path), "already exists")
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_info_prints_hardware_and_layers():
    result = run_cli("info", "digit-cnn")
    assert result.returncode == 0, result.stderr
    assert "VNNI" in result.stdout and "Conv2d" in result.stdout and "GFLOPs" in result.stdout
