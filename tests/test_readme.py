"""README.md is executable documentation: every example in it runs, as written, on this checkout.

How the README is read (``parse_readme``):

* a ```` ```python ```` block is one example, run in a fresh interpreter with torch at one thread;
  a line ending in ``# prints: TEXT`` means TEXT must appear in what the block prints;
* in a ```` ```bash ```` block every ``slimtorch ...`` line is one example, run as
  ``python -m slimtorch.cli ...`` with this checkout's ``src`` first on ``PYTHONPATH``. In a line
  ``bash scripts/setup.sh && X`` only X runs (never setup.sh); the test command
  (``python3 -m pytest -q``) is not run from here, it must be the one ``.ci/run`` calls;
* a ```` ```text ```` block is the output of the last example before it: every decimal number on
  its lines, except timings (lines with "time"), must appear in that example's output; on a line
  with "%" (accuracies) a printed number within ``PERCENT_TOL`` of it counts — the CPU's float
  kernels (AVX2 or AVX512) flip a few rounding decisions: ResNet-20 W4A4 top-1 92.29 or 92.31.

All examples run in document order in one temporary directory, so relative paths such as
``runs/...`` land there and later examples reuse the artifacts of earlier ones, as a reader
running them in order would. Also checked (fast): the README's length and opening commands,
links from README.md and docs/ to files, and that every inline ``slimtorch ...`` is run here.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_LINES = 200
SETUP = ["bash", "scripts/setup.sh"]
TEST_COMMAND = "python3 -m pytest -q"
PRINTS = re.compile(r"#\s*prints:\s*(.+?)\s*$")
DECIMAL = re.compile(r"\d+\.\d+")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CLI = re.compile(r"`(slimtorch [^`]+)`")
PERCENT_TOL = 0.05  # percentage points: 5 of 10 000 test images
TIMEOUT_S = 1800


@dataclass
class Example:
    kind: str                 # "python" | "cli"
    line: int                 # 1-based line in README.md
    code: str                 # python source, or the slimtorch command line
    expect_text: list[str] = field(default_factory=list)      # must appear verbatim
    expect_numbers: list[str] = field(default_factory=list)   # decimals that must appear
    expect_close: list[str] = field(default_factory=list)     # percentages, ± PERCENT_TOL

    @property
    def id(self) -> str:
        words = [w for w in shlex.split(self.code)[1:] if not w.startswith("--")]
        return f"L{self.line}-" + ("-".join(words[:3]) if self.kind == "cli" else "python")


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(info string, line of the first content line, lines) of every fenced block."""
    blocks, info, start, body = [], None, 0, []
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if info is None:
                info, start, body = line[3:].strip(), n + 1, []
            else:
                blocks.append((info, start, body))
                info = None
        elif info is not None:
            body.append(line)
    if info is not None:
        raise ValueError(f"README.md: the code block opened at line {start - 1} is not closed")
    return blocks


def _cli_commands(line: str) -> list[str]:
    """The slimtorch command(s) of one bash line; setup.sh and the test command are not run."""
    out = []
    for part in line.split("&&"):
        words = shlex.split(part, comments=True)
        if not words or words == SETUP or " ".join(words) == TEST_COMMAND:
            continue
        assert words[0] == "slimtorch", f"README bash line runs {words[0]!r}: {line!r}"
        out.append(" ".join(shlex.quote(w) for w in words))
    return out


def parse_readme(text: str) -> tuple[list[Example], list[str]]:
    """The examples in document order, and every bash line (for the structure checks)."""
    examples: list[Example] = []
    bash_lines: list[str] = []
    for info, start, body in fenced_blocks(text):
        if info == "python":
            code = "\n".join(body) + "\n"
            prints = [m.group(1) for m in map(PRINTS.search, body) if m]
            examples.append(Example("python", start, code, expect_text=prints))
        elif info == "bash":
            for i, line in enumerate(body):
                if line.strip():
                    bash_lines.append(line.strip())
                examples += [Example("cli", start + i, c) for c in _cli_commands(line)]
        elif info == "text":
            assert examples, f"README line {start}: an output block before any example"
            for line in body:
                if "time" not in line:
                    (examples[-1].expect_close if "%" in line else
                     examples[-1].expect_numbers).extend(DECIMAL.findall(line))
    return examples, bash_lines


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
    return env


def run_example(ex: Example, cwd: Path) -> subprocess.CompletedProcess:
    """Run one example in ``cwd`` and check its output; raises AssertionError on failure."""
    if ex.kind == "python":
        script = cwd / f"readme_L{ex.line}.py"
        script.write_text(ex.code)
        boot = ("import runpy, sys, torch; torch.set_num_threads(1); "
                "runpy.run_path(sys.argv[1], run_name='__main__')")
        argv = [sys.executable, "-c", boot, str(script)]
    else:
        args = shlex.split(ex.code)[1:]
        assert not any(a.startswith(("/", "..")) for a in args), \
            f"README line {ex.line}: use relative paths so the test can run it in a tmp dir"
        argv = [sys.executable, "-m", "slimtorch.cli", *args]
    proc = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    where = f"README.md line {ex.line} ({ex.code.splitlines()[0]!r})"
    assert proc.returncode == 0, (f"{where} exited {proc.returncode}\n--- stdout\n"
                                  f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
    for text in ex.expect_text:
        assert text in proc.stdout, f"{where}: README says it prints {text!r}; it printed\n" \
                                    f"{proc.stdout[-3000:]}"
    missing = missing_numbers(ex, proc.stdout)
    assert not missing, f"{where}: README shows {missing}, not in the output\n{proc.stdout[-3000:]}"
    return proc


def missing_numbers(ex: Example, output: str) -> list[str]:
    """The README's numbers for ``ex`` that its output does not show (``expect_close`` ones:
    no printed number within PERCENT_TOL)."""
    printed = set(DECIMAL.findall(output))
    values = [float(p) for p in printed]
    return ([n for n in ex.expect_numbers if n not in printed]
            + [n for n in ex.expect_close
               if n not in printed and not any(abs(v - float(n)) <= PERCENT_TOL for v in values)])


def test_percentages_match_within_tolerance_and_nothing_else_does():
    ex = Example("cli", 0, "slimtorch x", expect_numbers=["1.095"], expect_close=["92.29"])
    assert missing_numbers(ex, "size 1.095 MB top-1 92.31") == []
    assert missing_numbers(ex, "size 1.095 MB top-1 92.41") == ["92.29"]
    assert missing_numbers(ex, "size 1.096 MB top-1 92.29") == ["1.095"]


EXAMPLES, BASH_LINES = parse_readme(README.read_text())


# ---------------------------------------------------------------- fast structure checks
def test_readme_is_short_and_opens_with_the_two_commands():
    n = len(README.read_text().splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines, over {MAX_LINES}: move notes to docs/"
    first, second = BASH_LINES[:2]
    assert first.startswith("bash scripts/setup.sh && slimtorch quantize "), first
    assert second == f"bash scripts/setup.sh && {TEST_COMMAND}", second
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert second in ci, ".ci/run must call exactly the README's test command"


def test_every_inline_command_is_one_that_runs():
    prose = re.sub(r"```.*?```", "", README.read_text(), flags=re.S)
    run = {" ".join(shlex.split(ex.code)) for ex in EXAMPLES if ex.kind == "cli"}
    for cmd in INLINE_CLI.findall(prose):
        assert " ".join(shlex.split(cmd)) in run, \
            f"README mentions `{cmd}` outside a bash block, where no test runs it"


@pytest.mark.parametrize("doc", [README, *sorted((REPO / "docs").glob("*.md"))],
                         ids=lambda p: p.name)
def test_links_point_to_files(doc):
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{doc.relative_to(REPO)} links to {target}, which does not exist"


def test_harness_catches_a_broken_example(tmp_path):
    """The README's earlier Python example raised AttributeError (``slimtorch.zoo`` is not an
    attribute until imported); the runner must report that, not pass it."""
    old = Example("python", 0,
                  'import slimtorch\nslimtorch.zoo.sources.load_model("zoo:resnet20")\n')
    with pytest.raises(AssertionError, match="AttributeError"):
        run_example(old, tmp_path)


# ---------------------------------------------------------------- the examples themselves
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda ex: ex.id)
def test_readme_example_runs(example, workdir):
    run_example(example, workdir)
