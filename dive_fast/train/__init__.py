"""The training app: ``python -m dive_fast.train`` (fine-tune, evaluate, report), with
``python -m dive_fast.train.evaluate`` and ``python -m dive_fast.train.pretrain`` beside it.

It needs open_clip and the data packages; the kernel library (``import dive_fast``) does not
import it. The Python entry points: ``main(argv)`` (errors raise), ``run(args)``.
"""


def main(argv=None):
    from .cli import main as _main
    return _main(argv)


def run(args, checked: bool = False):
    from .cli import run as _run
    return _run(args, checked)
