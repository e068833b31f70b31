"""The README opens with the two set-up commands, and CI runs the second one verbatim."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("```", 2)[1]
    return [line.strip() for line in block.splitlines()[1:]
            if line.strip() and not line.startswith("#")]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    train_cmd, test_cmd = _commands()
    assert train_cmd.endswith("python -m dive_fast.train")
    assert "pytest" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in [line.strip() for line in ci]


def test_ci_runs_the_gpu_check_dry_run_after_the_tests():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    test_cmd = _commands()[1]
    assert "bash benchmarks/gpu_check/gpu_check.sh --dry-run" in ci
    assert ci.index("bash benchmarks/gpu_check/gpu_check.sh --dry-run") > ci.index(test_cmd)


def test_the_gpu_check_fits_five_minutes():
    """The build's and the default stages' expected times add up to at most 5 minutes."""
    import sys
    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu_check"))
    import gpu_check
    total = gpu_check.BUILD_S[0] + sum(gpu_check.EXPECTED_S[s][0] for s in gpu_check.DEFAULT_STAGES)
    assert total <= 300, total
    assert "300 - SECONDS" in (ROOT / "benchmarks" / "gpu_check" / "gpu_check.sh").read_text()
