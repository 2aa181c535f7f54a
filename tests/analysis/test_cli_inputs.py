"""``cytonode classify`` and ``cytonode detect`` refuse inputs they cannot use with exit status 2
and one line, never a traceback (issue 22, defect 10)."""

from __future__ import annotations

import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.peers import CYTONODE


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (RGB) with almost no pixel data: the
    size checks must read no more than the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path


def _png(path: Path, width: int, height: int) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CYTONODE, *args], capture_output=True, text=True, timeout=300, check=False)


def _assert_one_line_exit_2(run: subprocess.CompletedProcess[str], *words: str) -> None:
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stdout == ""
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("command", ["classify", "detect"])
def test_decompression_bomb_and_tiny_images_exit_2_with_one_line(command: str, tmp_path: Path) -> None:
    bomb = _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    _assert_one_line_exit_2(_run(command, str(bomb)), "bomb.png", "20000 x 20000")
    tiny = _png(tmp_path / "tiny.png", 1, 1)
    _assert_one_line_exit_2(_run(command, str(tiny)), "tiny.png", "1 x 1")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    _assert_one_line_exit_2(_run(command, str(garbage)), "garbage.png")


def test_classify_refuses_images_too_large_for_one_cell(tmp_path: Path) -> None:
    # 100 megapixels: over PIL's bomb warning, under its error; far larger than one cell.
    large = _png_header_only(tmp_path / "field.png", 10000, 10000)
    _assert_one_line_exit_2(_run("classify", str(large)), "field.png", "10000 x 10000")
    # A folder with one bad image among good ones is refused before any model is loaded.
    folder = tmp_path / "cells"
    folder.mkdir()
    _png(folder / "a.png", 96, 96)
    _png(folder / "b.png", 4, 4)
    _assert_one_line_exit_2(_run("classify", str(folder)), "b.png")


def test_device_cuda_without_cuda_exits_2_with_one_line(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    cell = _png(tmp_path / "cell.png", 96, 96)
    _assert_one_line_exit_2(_run("classify", str(cell), "--device", "cuda"), "cuda")
