"""Build and inspection tools of the repository, never shipped in the package (flash-attention
keeps its `tools/` the same way): `python -m tools.aot` compiles every GPU kernel ahead of
time and reads its machine code with `tools.sass`. Run from the repository root."""
