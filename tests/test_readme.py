"""Every quick-start block of the README runs, as written, on fresh fixture checkpoints and the example data.

A block is one fenced `bash` block under "## Quick start on your own checkpoint"; it runs with `bash -e` in a
folder holding a copy of `examples/`, where the first block builds the fixtures. A block that fails, prints a
stack trace, or prints nothing fails its test.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Quick start on your own checkpoint"


def quick_start_blocks(readme: Path = REPO / "README.md") -> list[tuple[str, str]]:
    """(heading, script) of every bash block in the quick-start section, in order."""
    text = readme.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end > 0 else None]
    blocks, heading = [], "setup"
    for match in re.finditer(r"(?m)^### ([^\n]+)$|^```bash\n(.*?)^```", section, flags=re.S):
        if match.group(1):
            heading = re.sub(r"\s*\(\[docs\].*$", "", match.group(1)).strip()
        else:
            blocks.append((heading, match.group(2)))
    return blocks


BLOCKS = quick_start_blocks()


def test_the_quick_start_has_a_block_per_area() -> None:
    headings = " ".join(h.lower() for h, _ in BLOCKS)
    for area in ("streaming", "thinker", "serving", "pruning", "vision", "reasoning", "analysis"):
        assert area in headings, f"no quick start for {area}"
    assert all(len(script.strip().splitlines()) <= 12 for _, script in BLOCKS), "a quick start is 5-10 lines"


def _run(heading: str, script: str, folder: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "BRISK_DEVICE": "cpu"}
    process = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", script], cwd=folder, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=900)
    finally:  # a block that starts a server in the background leaves nothing running, even when it fails
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert done.returncode == 0, f"{heading}:\n{script}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stdout.strip(), f"{heading}: the block printed nothing"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder with a copy of examples/ where the first block (building the fixtures) has run."""
    folder = tmp_path_factory.mktemp("readme")
    shutil.copytree(REPO / "examples", folder / "examples")
    _run(*BLOCKS[0], folder)
    return folder


@pytest.mark.parametrize("index", range(1, len(BLOCKS)),
                         ids=[re.sub(r"\W+", "-", h).strip("-").lower() for h, _ in BLOCKS[1:]])
def test_quick_start_block_runs(index: int, workdir: Path) -> None:
    _run(*BLOCKS[index], workdir)
