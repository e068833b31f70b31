"""The training command line of the tests' short runs."""


def train_args(out, *extra):
    """A few seconds of training on the world with the micro model."""
    return ["--model", "dive-micro", "--out", str(out), "--steps", "4", "--batch-size", "8",
            "--train-size", "32", "--ref-size", "32", "--eval-per-task", "10", "--workers", "0",
            "--no-progress", "--wise-ft", "", "--checkpoint-every", "2", "--log-every", "1",
            "--lr", "1e-3", *extra]
