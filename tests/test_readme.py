"""Every command block in the README runs here as shown, or says why it cannot.

Each ```sh block is preceded by a marker comment:

- ``<!-- readme-test: run -->``: each ``$ command`` line is run with bash from the repository
  root; the lines after it, up to the next command or a blank line, are its expected output
  (compared as JSON when they parse as JSON, else as text).
- ``<!-- readme-test: run-with-demo -->``: the same, while ``sqlproxy demo`` serves on the ports
  the README names (127.0.0.1:16432, admin 127.0.0.1:18080).
- ``<!-- readme-test: skip: <reason> -->``: not run here, for the reason given.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = re.compile(r"<!-- readme-test: (run-with-demo|run|skip: [^>]+?) -->\n```sh\n(.*?)```",
                    re.DOTALL)
DEMO_LISTEN, DEMO_ADMIN = "127.0.0.1:16432", "127.0.0.1:18080"


def blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in MARKER.finditer(README.read_text())]


def commands(block: str) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) pairs of a block."""
    out: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            out.append((line[2:], []))
        elif line.strip() and out:
            out[-1][1].append(line)
    return out


def run_block(block: str) -> None:
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}
    for command, expected in commands(block):
        got = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120)
        output = (got.stdout + got.stderr).strip()
        want = "\n".join(expected).strip()
        if not want:
            assert got.returncode == 0, f"{command}: exit {got.returncode}: {output}"
            continue
        try:
            parsed: Any = json.loads(want)
        except json.JSONDecodeError:
            assert output == want, command
        else:
            assert json.loads(output) == parsed, command


def test_every_sh_block_is_marked() -> None:
    text = README.read_text()
    assert text.count("```sh") == len(blocks()), "a ```sh block without a readme-test marker"
    assert blocks()


@pytest.mark.parametrize("index", range(len(blocks())))
def test_readme_block(index: int, request: pytest.FixtureRequest) -> None:
    mode, block = blocks()[index]
    if mode.startswith("skip: "):
        assert len(mode) > len("skip: ") + 10, "say why the block cannot run"
        return
    assert commands(block), "a runnable block shows `$ command` lines"
    if mode == "run-with-demo":
        request.getfixturevalue("readme_demo")
    run_block(block)


@pytest.fixture(scope="module")
def readme_demo() -> Iterator[None]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sqlproxy", "demo", "--listen", DEMO_LISTEN, "--admin", DEMO_ADMIN],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("SQLPROXY_")},
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 240
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Serving until Ctrl-C" in line:
                break
            if time.monotonic() > deadline:
                break
        else:
            pytest.fail("the demo ended before serving:\n" + "".join(lines[-40:]))
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
