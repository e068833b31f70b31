"""A site folder for a child ``python -S``: the installed packages, less some, so that a
test sees what an environment without them (or without dive_fast installed) would see."""
from __future__ import annotations

import sysconfig
from pathlib import Path


def site_folder(folder: Path, hidden=()) -> Path:
    """``folder`` filled with links to every installed package but the ``hidden`` ones and
    any editable install of dive_fast (its finder would answer for a module the tested tree
    lacks, such as a _C that was not built): with ``python -S`` and this folder on sys.path,
    only the tree under test provides dive_fast."""
    packages = Path(sysconfig.get_paths()["purelib"])
    hidden = {n.lower() for n in hidden}
    folder.mkdir(parents=True, exist_ok=True)
    for entry in packages.iterdir():
        name = entry.name.split("-")[0].split(".")[0].lower()
        if name not in hidden and not entry.name.startswith(("__editable__", "_dive_fast")):
            (folder / entry.name).symlink_to(entry)
    return folder
