"""What the project's commands share (the app's, the world's, the benchmarks'): the help
format and one-line argument errors (``arguments``), and log-friendly progress bars
(``progress``, tqdm imported on first use). Not part of the kernel library's API."""
