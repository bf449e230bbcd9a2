"""The README's Python example runs as written (with the real SmolLM2 policy from the wheel)."""

import ast
import pathlib
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Using the pieces")
    start = text.index("```python\n", start) + len("```python\n")
    return text[start:text.index("```", start)]


@pytest.mark.slow
def test_using_the_pieces_example_runs_as_written(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(_example(), encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    best_t, win = ast.literal_eval(lines[-1])   # (best exponent, its win rate)
    assert 0.5 < float(lines[-2]) < 1.0 and best_t > 0 and 0.5 < win < 1.0
