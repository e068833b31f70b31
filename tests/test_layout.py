"""How the package is put together: the kernel library needs torch alone, no module
imports its way back to itself, the world never imports the app, and the frozen model sees
what the trainable one sees."""
import ast
import subprocess
import sys
from pathlib import Path

import torch

PACKAGE = Path(__file__).resolve().parents[1] / "dive_fast"
# numpy stays visible: torch itself probes for it (torch._dynamo's trace rules).
TRAINING_APP_ONLY = ("open_clip", "matplotlib", "webdataset", "tqdm", "PIL", "torchvision",
                     "safetensors", "braceexpand", "triton", "scipy")


def test_the_kernel_library_imports_and_runs_with_torch_alone(tmp_path):
    """In a site folder holding every installed package but those only the training app
    needs, DiVELoss imports, runs forward and backward, and names its backends."""
    import sysconfig
    packages = Path(sysconfig.get_paths()["purelib"])
    hidden = {n.lower() for n in TRAINING_APP_ONLY} | {"open_clip_torch", "pillow"}
    for entry in packages.iterdir():
        name = entry.name.split("-")[0].split(".")[0].lower()
        if name not in hidden and not entry.name.startswith(("__editable__", "_dive_fast")):
            (tmp_path / entry.name).symlink_to(entry)
    code = f"""
import sys
sys.path[:0] = [{str(PACKAGE.parent)!r}, {str(tmp_path)!r}]
import torch
import dive_fast
from dive_fast import DiVELoss, info
x = [torch.randn(6, 8, requires_grad=i % 2 == 0) for i in range(4)]
loss = DiVELoss(8)(*x)
loss.backward()
assert torch.isfinite(loss) and x[0].grad is not None
info.main()
for name in {TRAINING_APP_ONLY!r}:
    try:
        __import__(name)
    except ImportError:
        continue
    raise AssertionError(name + " is importable: the test hides nothing")
print("ok")
"""
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def _imports(path: Path) -> set[str]:
    """dive_fast modules that ``path`` imports, at any depth of the file."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n.startswith("dive_fast")}
    return found


def test_no_import_cycles():
    files = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in PACKAGE.rglob("*.py")}
    graph = {m: {t for t in _imports(p) if t in files and t != m} for m, p in files.items()}
    # a package's __init__ importing its own submodules is not a cycle through the package
    for m in graph:
        graph[m] = {t for t in graph[m] if not m.startswith(t + ".")}
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
    assert "dive_fast.train.pretrain" not in graph["dive_fast.train.models"]  # a loader never trains
    # The world is below the app: the app reads it, it never reaches up into the app.
    upward = {m: sorted(t for t in graph[m] if t.startswith("dive_fast.train"))
              for m in graph if m.startswith("dive_fast.world")}
    assert not any(upward.values()), upward


def test_frozen_embeddings_equal_the_trainable_ones_at_step_zero_under_bf16():
    """Identical weights give u = v = 0 up to the rounding of one batch shape against
    another (the trainable forward runs target and reference rows together), also under
    bf16 autocast, where a frozen copy cast to bf16 would differ by a noise floor."""
    from dive_fast.train.frozen import FrozenReference
    from dive_fast.train.methods import Batch, make_method
    from dive_fast.train.models import frozen_copy, load_clip

    torch.manual_seed(0)
    bundle = load_clip("dive-micro")
    model = bundle.model.train()
    frozen = FrozenReference(frozen_copy(model), "cpu", torch.bfloat16)
    method = make_method("dive", model, bundle.tokenizer, ["a", "b"], ["{}"], device="cpu",
                         frozen=frozen, amp_dtype=torch.bfloat16)
    images, ref_images = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    tokens = bundle.tokenizer([f"a caption number {i}" for i in range(8)])
    batch = Batch(images, torch.zeros(8, dtype=torch.long), ref_images, tokens)
    (_, img_r), (_, txt_r) = method.encode([images, ref_images], [tokens, tokens])
    img0, txt0 = frozen.launch(batch)()
    norm = lambda x: torch.nn.functional.normalize(x.float(), dim=-1)  # noqa: E731
    u = (norm(img_r) - img0).norm(dim=-1).mean().item()
    v = (norm(txt_r) - txt0).norm(dim=-1).mean().item()
    # The floor: the frozen model itself on the concatenated batch against the reference
    # rows alone (the same weights, another batch shape).
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        both = frozen.model.encode_image(torch.cat([images, ref_images]))[8:]
    floor = (norm(both) - img0).norm(dim=-1).mean().item()
    assert u <= 2 * floor + 1e-6 and v <= 1e-6, (u, v, floor)
    cast = frozen_copy(model).to(torch.bfloat16)  # what the loop did before
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        old = norm(cast.encode_image(ref_images))
    assert (norm(img_r) - old).norm(dim=-1).mean().item() > 2 * u


def test_importing_the_library_imports_no_training_app_module():
    """``import dive_fast`` (the kernel library) loads neither the training app nor the world."""
    code = ("import sys, dive_fast; from dive_fast import DiVELoss, dive_loss, micro_batched_backward;"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('dive_fast', 'open_clip')))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.split()
    assert "dive_fast.ops.dive" in loaded  # the check sees what was imported
    app = [m for m in loaded if m.startswith(("dive_fast.train", "dive_fast.world", "open_clip"))]
    assert not app, app


def test_the_training_app_is_one_subpackage():
    """The kernel library is the top of the package and ops/; the training app (open_clip,
    data formats) is dive_fast/train/, the generated world dive_fast/world/."""
    top = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if p.is_dir()}
    assert top - {"__pycache__"} <= {"__init__", "_argparse", "_extension", "_progress",
                                     "accumulate", "backends", "info", "loss", "testing", "ops",
                                     "train", "world"}, top
    # dive_fast.train's entry points, main() and run(), would be shadowed by a submodule of
    # that name once anything imports it
    app = {p.stem for p in (PACKAGE / "train").iterdir()}
    assert not {"main", "run"} & app, app
    for path in PACKAGE.rglob("*.py"):
        if {"train", "world"} & set(path.relative_to(PACKAGE).parts) or path.name == "info.py":
            continue  # info reports open_clip's version when it is there
        imported = {a.name for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.Import) for a in node.names}
        imported |= {node.module or "" for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.ImportFrom) and not node.level}
        assert not {m for m in imported if m.split(".")[0] in ("open_clip", "webdataset")}, path
