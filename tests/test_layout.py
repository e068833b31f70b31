"""How the package is put together: the kernel library needs torch alone, no module
imports its way back to itself, the world never imports the app, and the frozen model sees
what the trainable one sees."""
import ast
import subprocess
import sys
from pathlib import Path

import torch
from helpers.site import site_folder

PACKAGE = Path(__file__).resolve().parents[1] / "dive_fast"
# numpy stays visible: torch itself probes for it (torch._dynamo's trace rules).
TRAINING_APP_ONLY = ("open_clip", "matplotlib", "webdataset", "tqdm", "PIL", "torchvision",
                     "safetensors", "braceexpand", "triton", "scipy")


def test_the_kernel_library_imports_and_runs_with_torch_alone(tmp_path):
    """In a site folder holding every installed package but those only the training app
    needs, DiVELoss imports, runs forward and backward, and names its backends."""
    site_folder(tmp_path, {*TRAINING_APP_ONLY, "open_clip_torch", "pillow"})
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
    def name(p):
        return ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
    files = {name(p).removesuffix(".__init__"): p for p in PACKAGE.rglob("*.py")}
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
    # a loader never trains
    assert "dive_fast.train.pretrain" not in graph["dive_fast.train.models"]
    # The world is below the app: the app reads it, it never reaches up into the app.
    upward = {m: sorted(t for t in graph[m] if t.startswith("dive_fast.train"))
              for m in graph if m.startswith("dive_fast.world")}
    assert not any(upward.values()), upward


def test_frozen_embeddings_equal_the_trainable_ones_at_step_zero_under_bf16():
    """Identical weights give u = v = 0 up to the rounding of one batch shape against
    another (the trainable forward runs target and reference rows together), also under
    bf16 autocast with the frozen copy's matmul weights stored in bf16, where a frozen copy
    cast to bf16 whole would differ by a noise floor."""
    from dive_fast.train.frozen import FrozenReference
    from dive_fast.train.methods import Batch, make_method
    from dive_fast.train.models import frozen_copy, load_clip

    torch.manual_seed(0)
    bundle = load_clip("dive-micro")
    model = bundle.model.train()
    frozen = FrozenReference(frozen_copy(model, torch.bfloat16), "cpu", torch.bfloat16)
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
    code = ("import sys, dive_fast\n"
            "from dive_fast import DiVELoss, dive_loss, micro_batched_backward\n"
            "mods = [m for m in sys.modules if m.startswith(('dive_fast', 'open_clip'))]\n"
            "print(' '.join(sorted(mods)))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.split()
    assert "dive_fast.ops.dive" in loaded  # the check sees what was imported
    app = [m for m in loaded if m.startswith(("dive_fast.train", "dive_fast.world", "open_clip"))]
    assert not app, app


def test_the_training_app_is_one_subpackage():
    """The kernel library is the top of the package and ops/; the training app (open_clip,
    data formats) is dive_fast/train/, the generated world dive_fast/world/."""
    top = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if p.is_dir()}
    assert top - {"__pycache__"} <= {"__init__", "_cli", "accumulate", "info", "loss",
                                     "testing", "ops", "train", "world"}, top
    # dive_fast.train's entry points, main() and run(), would be shadowed by a submodule of
    # that name once anything imports it
    app = {p.stem for p in (PACKAGE / "train").iterdir()}
    assert not {"main", "run"} & app, app


def _third_party_imports(path: Path) -> dict[str, bool]:
    """{top-level module: whether every import of it is guarded by a try that catches
    ImportError} for the modules outside the standard library and dive_fast."""
    tree = ast.parse(path.read_text())
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                h.type is None or any(isinstance(n, ast.Name) and n.id in (
                    "ImportError", "ModuleNotFoundError", "Exception")
                    for n in ast.walk(h.type)) for h in node.handlers):
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found: dict[str, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top != "dive_fast":
                found[top] = found.get(top, True) and id(node) in guarded
    return found


def test_the_library_half_imports_torch_alone():
    """dive_fast/*.py and dive_fast/ops/ (the kernel library; `pip install .` gives it torch
    alone) import no third-party module but torch, except triton (the Triton backend, when
    installed) and open_clip (info reports its version), each only inside a try that
    catches ImportError; the Triton kernels' own module (dive_triton.py) imports triton
    outright, and is imported only once triton is known to be there (the torch-alone run
    above proves it)."""
    files = [*PACKAGE.glob("*.py"), *(PACKAGE / "ops").rglob("*.py")]
    assert len(files) > 5
    for path in files:
        for module, guarded in _third_party_imports(path).items():
            optional = module in ("triton", "open_clip")
            guarded = guarded or (module == "triton" and path.name == "dive_triton.py")
            assert module == "torch" or (optional and guarded), \
                f"{path.relative_to(PACKAGE.parent)} imports {module}" + (
                    " outside a try" if optional else "")


def _setup_arguments(monkeypatch) -> dict:
    """The arguments setup.py gives setuptools.setup, from running it with the extension
    skipped (nothing compiles, torch is not imported)."""
    import runpy

    import setuptools
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.setenv("DIVE_FAST_BUILD_EXT", "0")
    monkeypatch.chdir(PACKAGE.parent)
    runpy.run_path(str(PACKAGE.parent / "setup.py"), run_name="__main__")
    return captured


def test_setup_installs_the_library_with_torch_alone(monkeypatch):
    """`pip install .` asks for torch only; the app's packages come with the extra `train`,
    the tests' with `test` (which holds `train`); only dive_fast is installed (not tools/,
    tests/ or benchmarks/), at the version the package states."""
    import dive_fast
    kw = _setup_arguments(monkeypatch)
    assert [r.split(">")[0].split("=")[0] for r in kw["install_requires"]] == ["torch"]
    train, test = kw["extras_require"]["train"], kw["extras_require"]["test"]
    names = {r.split(">")[0].split("=")[0].lower() for r in train}
    assert {"open_clip_torch", "pillow", "webdataset", "braceexpand", "safetensors", "tqdm",
            "numpy"} <= names, names
    assert set(train) <= set(test) and "pytest>=7.3" in test
    assert all(p.split(".")[0] == "dive_fast" for p in kw["packages"]), kw["packages"]
    assert {"dive_fast", "dive_fast.ops", "dive_fast.train", "dive_fast.world"} <= \
        set(kw["packages"])
    assert kw["version"] == dive_fast.__version__
