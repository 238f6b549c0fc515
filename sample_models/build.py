#!/usr/bin/env python
"""Build the bundled sample models (deterministic).

Usage::

    python sample_models/build.py

Trains the four architectures from ``architectures.py`` on scikit-learn's
bundled digits data set (no download needed), exports every model as

* ``NAME.onnx``            - legacy TorchScript-based ONNX exporter, opset 17,
                             input ``input`` / output ``logits``, dynamic batch,
                             BatchNormalization kept (no constant folding)
* ``NAME_state_dict.pt``   - ``torch.save(model.state_dict())``
* ``NAME_script.pt``       - ``torch.jit.script`` module
* ``NAME.pt2``             - ``torch.export`` program with dynamic batch dim

plus ``digits_test.npz`` (held-out test split, ``x`` and ``y``) and
``digits_calib.npz`` (256 training samples, ``x`` only).  Every written file is
re-loaded and evaluated, and ``README.md`` is regenerated with the results.
"""

from __future__ import annotations

import io
import os
import random
import sys
import warnings
import zipfile
from pathlib import Path

# Must be set before any CUDA/cuBLAS initialisation; harmless on CPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from architectures import ARCHITECTURES  # noqa: E402

SEED = 0
TEST_SIZE = 0.25
SPLIT_RANDOM_STATE = 0
N_CALIB = 256
BATCH_SIZE = 32
OPSET = 17

# Per-model training hyper-parameters (Adam + cosine LR decay).
TRAIN_CONFIG = {
    "mlp": {"epochs": 40, "lr": 2e-3, "weight_decay": 1e-4},
    "lenet": {"epochs": 40, "lr": 3e-3, "weight_decay": 1e-4},
    "resnet": {"epochs": 30, "lr": 1e-2, "weight_decay": 1e-4},
    "mobilenet": {"epochs": 40, "lr": 1e-2, "weight_decay": 1e-4},
}

# Fixed timestamp for zip members we write ourselves (makes .npz bit-identical).
_ZIP_DATE = (2020, 1, 1, 0, 0, 0)


# --------------------------------------------------------------------------- #
# Reproducibility helpers
# --------------------------------------------------------------------------- #
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if hasattr(torch.backends, "cudnn"):
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #
def load_data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / np.float32(16.0))[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SIZE, random_state=SPLIT_RANDOM_STATE, stratify=y
    )
    rng = np.random.RandomState(SEED)
    calib_idx = np.sort(rng.choice(len(x_train), size=N_CALIB, replace=False))
    x_calib = x_train[calib_idx]
    return (
        np.ascontiguousarray(x_train),
        np.ascontiguousarray(y_train),
        np.ascontiguousarray(x_test),
        np.ascontiguousarray(y_test),
        np.ascontiguousarray(x_calib),
    )


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps (reproducible bytes)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


# --------------------------------------------------------------------------- #
# Training / evaluation
# --------------------------------------------------------------------------- #
def train(name: str, x_train: np.ndarray, y_train: np.ndarray) -> nn.Module:
    cfg = TRAIN_CONFIG[name]
    seed_everything(SEED)
    model = ARCHITECTURES[name]()
    xt = torch.from_numpy(x_train)
    yt = torch.from_numpy(y_train)
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    steps_per_epoch = (len(xt) + BATCH_SIZE - 1) // BATCH_SIZE
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg["lr"], total_steps=cfg["epochs"] * steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _epoch in range(cfg["epochs"]):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), BATCH_SIZE):
            idx = perm[i : i + BATCH_SIZE]
            if len(idx) < 2:  # BatchNorm needs > 1 sample
                continue
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def accuracy_from_logits(logits: np.ndarray, y: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(axis=1) == y).mean())


@torch.no_grad()
def torch_predict(fn, x: np.ndarray, batch: int = 128) -> np.ndarray:
    outs = []
    for i in range(0, len(x), batch):
        outs.append(fn(torch.from_numpy(x[i : i + batch])).detach().numpy())
    return np.concatenate(outs)


# --------------------------------------------------------------------------- #
# Export
# --------------------------------------------------------------------------- #
def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    """Export with the legacy TorchScript exporter (no onnxscript needed).

    ``do_constant_folding=False`` keeps BatchNormalization nodes (eval-mode
    constant folding would otherwise fuse them into the preceding Conv).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            export_params=True,
            opset_version=OPSET,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.EVAL,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    n = undo_initializer_dedup(path)
    if n:
        print(f"  replaced {n} Identity node(s) on shared initializers by separate initializers")
    return "torch.onnx.export(dynamo=False, do_constant_folding=False)"


def undo_initializer_dedup(path: Path) -> int:
    """Give every parameter its own initializer again.

    The legacy exporter merges initializers with identical values and
    re-creates the duplicates through ``Identity`` nodes.  In the ResNet the
    residual-branch BN bias and the shortcut BN bias receive identical gradients
    and therefore end up bit-identical.  Replace each such ``Identity`` by a
    copy of the initializer under the original parameter name so that every
    layer keeps its own, named parameters and the graph has no Identity nodes.
    """
    import onnx

    proto = onnx.load(str(path))
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    keep, n = [], 0
    for node in graph.node:
        if node.op_type == "Identity" and len(node.input) == 1 and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
            inits[copy.name] = copy
            n += 1
        else:
            keep.append(node)
    if n:
        del graph.node[:]
        graph.node.extend(keep)
        onnx.save(proto, str(path))
    return n


def export_script(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            scripted = torch.jit.script(model)
            kind = "script"
        except Exception as exc:  # pragma: no cover - fallback
            print(f"  torch.jit.script failed ({exc!r}); falling back to trace")
            scripted = torch.jit.trace(model, (example,))
            kind = "trace"
        torch.jit.save(scripted, str(path))
    return kind


def export_pt2(model: nn.Module, example: torch.Tensor, path: Path) -> bool:
    """torch.export with a dynamic batch dimension; returns True if dynamic."""
    try:
        batch = torch.export.Dim("batch", min=1, max=4096)
        ep = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        dynamic = True
    except Exception as exc:  # pragma: no cover - fallback
        print(f"  dynamic torch.export failed ({exc!r}); exporting static shape")
        ep = torch.export.export(model, (example,))
        dynamic = False
    torch.export.save(ep, str(path))
    return dynamic


# --------------------------------------------------------------------------- #
# Re-load + verify
# --------------------------------------------------------------------------- #
def check_onnx(path: Path, x_test: np.ndarray, y_test: np.ndarray):
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    op_types = sorted({n.op_type for n in proto.graph.node})
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    # Dynamic batch: batch 1 and batch 32 must both run.
    for b in (1, 32):
        out = sess.run(["logits"], {"input": x_test[:b]})[0]
        assert out.shape == (b, 10), out.shape
    logits = sess.run(["logits"], {"input": x_test})[0]
    return accuracy_from_logits(logits, y_test), op_types, logits


def human_size(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #
def _reexec_with_fixed_hash_seed() -> None:
    """Re-run this script with PYTHONHASHSEED=0.

    TorchScript serialises module constants in set-iteration order, which
    depends on Python's string-hash randomisation; fixing the hash seed makes
    the ``*_script.pt`` files (and hence all outputs) bit-identical across runs.
    """
    if os.environ.get("PYTHONHASHSEED") != "0":
        env = dict(os.environ, PYTHONHASHSEED="0")
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]], env)


def main() -> int:
    torch.set_num_threads(1)  # deterministic reductions, independent of core count
    seed_everything(SEED)
    x_train, y_train, x_test, y_test, x_calib = load_data()
    print(f"digits: train={len(x_train)} test={len(x_test)} calib={len(x_calib)}")

    save_npz(HERE / "digits_test.npz", x=x_test, y=y_test)
    save_npz(HERE / "digits_calib.npz", x=x_calib)

    example = torch.from_numpy(x_test[:2].copy())
    rows = []
    problems: list[str] = []
    for name in ARCHITECTURES:
        print(f"[{name}] training ...")
        model = train(name, x_train, y_train)
        n_params = sum(p.numel() for p in model.parameters())
        eager_logits = torch_predict(model, x_test)
        eager_acc = accuracy_from_logits(eager_logits, y_test)
        print(f"[{name}] params={n_params} eager test acc={eager_acc:.4f}")

        paths = {
            "onnx": HERE / f"{name}.onnx",
            "state_dict": HERE / f"{name}_state_dict.pt",
            "script": HERE / f"{name}_script.pt",
            "pt2": HERE / f"{name}.pt2",
        }
        onnx_path = export_onnx(model, example, paths["onnx"])
        torch.save(model.state_dict(), paths["state_dict"])
        script_kind = export_script(model, example, paths["script"])
        pt2_dynamic = export_pt2(model, example, paths["pt2"])

        # ---- re-load everything from disk and evaluate ----
        onnx_acc, op_types, onnx_logits = check_onnx(paths["onnx"], x_test, y_test)
        max_diff = float(np.abs(onnx_logits - eager_logits).max())

        fresh = ARCHITECTURES[name]()
        fresh.load_state_dict(torch.load(paths["state_dict"], map_location="cpu", weights_only=True))
        fresh.eval()
        sd_acc = accuracy_from_logits(torch_predict(fresh, x_test), y_test)

        scripted = torch.jit.load(str(paths["script"]), map_location="cpu")
        scripted.eval()
        script_acc = accuracy_from_logits(torch_predict(scripted, x_test), y_test)

        pt2_mod = torch.export.load(str(paths["pt2"])).module()
        for b in (1, 32):
            if pt2_dynamic or b == example.shape[0]:
                with torch.no_grad():
                    assert pt2_mod(torch.from_numpy(x_test[:b])).shape == (b, 10)
        if pt2_dynamic:
            pt2_acc = accuracy_from_logits(torch_predict(pt2_mod, x_test), y_test)
        else:
            pt2_acc = accuracy_from_logits(torch_predict(pt2_mod, x_test, batch=example.shape[0]), y_test)

        for label, acc in (("state_dict", sd_acc), ("onnx", onnx_acc), ("script", script_acc), ("pt2", pt2_acc)):
            if abs(acc - eager_acc) > 1e-9:
                problems.append(f"{name}: {label} accuracy {acc:.4f} != eager {eager_acc:.4f}")
        if eager_acc < 0.95:
            problems.append(f"{name}: test accuracy {eager_acc:.4f} < 0.95")

        sizes = {k: p.stat().st_size for k, p in paths.items()}
        rows.append(
            {
                "name": name,
                "params": n_params,
                "eager": eager_acc,
                "state_dict": sd_acc,
                "onnx": onnx_acc,
                "script": script_acc,
                "pt2": pt2_acc,
                "sizes": sizes,
                "op_types": op_types,
                "onnx_max_abs_diff": max_diff,
                "script_kind": script_kind,
                "pt2_dynamic": pt2_dynamic,
                "onnx_path": onnx_path,
            }
        )
        print(
            f"[{name}] onnx={onnx_acc:.4f} (max|Δlogits|={max_diff:.2e}) script={script_acc:.4f} "
            f"pt2={pt2_acc:.4f} state_dict={sd_acc:.4f} pt2_dynamic={pt2_dynamic}"
        )
        print(f"[{name}] ONNX op types: {', '.join(op_types)}")

    table = make_table(rows)
    print()
    print(table)
    write_readme(rows, table, len(x_test))
    total = sum(p.stat().st_size for p in HERE.iterdir() if p.is_file())
    print(f"\ntotal size of {HERE.name}/: {human_size(total)}")
    if problems:
        print("\nPROBLEMS:")
        for p in problems:
            print("  - " + p)
        return 1
    return 0


def make_table(rows) -> str:
    lines = [
        "| model | parameters | accuracy (ONNX) | accuracy (TorchScript) | accuracy (.pt2) | file sizes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        s = r["sizes"]
        sizes = (
            f"onnx {human_size(s['onnx'])}, state_dict {human_size(s['state_dict'])}, "
            f"script {human_size(s['script'])}, pt2 {human_size(s['pt2'])}"
        )
        lines.append(
            f"| {r['name']} | {r['params']:,} | {100 * r['onnx']:.2f} % | "
            f"{100 * r['script']:.2f} % | {100 * r['pt2']:.2f} % | {sizes} |"
        )
    return "\n".join(lines)


def write_readme(rows, table: str, n_test: int) -> None:
    ops = "\n".join(f"- `{r['name']}.onnx`: {', '.join(r['op_types'])}" for r in rows)
    text = f"""# Sample models

Small reference models for testing `nnc_tool`, trained on scikit-learn's bundled
**digits** data set (`sklearn.datasets.load_digits`: 1797 grey-scale 8x8 images,
10 classes; no download needed).

*This file is generated by `build.py`; do not edit by hand.*

## Models

All models take `float32` input of shape `[N, 1, 8, 8]` (pixel values divided by
16.0, i.e. in `[0, 1]`) and return logits of shape `[N, 10]`. Definitions are in
[`architectures.py`](architectures.py) (`ARCHITECTURES` maps the names below to classes).

| name | description |
|---|---|
| `mlp` | Flatten -> Linear(64,128) -> ReLU -> Linear(128,64) -> ReLU -> Linear(64,10) |
| `lenet` | LeNet-style CNN: conv3x3(16) -> ReLU -> maxpool2 -> conv3x3(32) -> ReLU -> maxpool2 -> Linear(128,64) -> ReLU -> Linear(64,10) |
| `resnet` | ResNet-style CNN with BatchNorm: stem conv3x3(16)+BN+ReLU, 3 basic blocks (16 identity shortcut; 32 stride 2 and 48 stride 2, each with 1x1 conv+BN shortcut), global average pool, Linear(48,10) |
| `mobilenet` | MobileNet-style CNN: stem conv3x3(16)+BN+ReLU, depthwise-separable blocks (depthwise conv3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU), two inverted-residual blocks (1x1 expand, depthwise 3x3, squeeze-excitation, 1x1 project, residual add), global average pool, Linear(64,10) |

## Files

For every model `NAME` in `mlp`, `lenet`, `resnet`, `mobilenet`:

| file | content |
|---|---|
| `NAME.onnx` | ONNX opset {OPSET}, input `input` `[batch, 1, 8, 8]`, output `logits` `[batch, 10]`, dynamic batch dimension. Exported with the legacy TorchScript-based exporter (`torch.onnx.export(..., dynamo=False, do_constant_folding=False)`) so `BatchNormalization` nodes are kept (not folded into `Conv`); every parameter is a named initializer (the exporter's initializer de-duplication is undone, so there are no `Identity` nodes). |
| `NAME_state_dict.pt` | `torch.save(model.state_dict())`; load into `architectures.ARCHITECTURES[NAME]()` |
| `NAME_script.pt` | TorchScript (`torch.jit.script`), load with `torch.jit.load` |
| `NAME.pt2` | `torch.export` ExportedProgram with a dynamic batch dimension, load with `torch.export.load(path).module()` |

Shared data files:

- `digits_test.npz`: held-out test split (stratified, `test_size={TEST_SIZE}`, `random_state={SPLIT_RANDOM_STATE}`):
  `x` float32 `[{n_test}, 1, 8, 8]`, `y` int64 `[{n_test}]`.
- `digits_calib.npz`: `x` float32 `[{N_CALIB}, 1, 8, 8]`, samples from the *training* split (for calibration).

## Rebuilding

```sh
python sample_models/build.py
```

The build is seeded and deterministic (single-threaded, `torch.use_deterministic_algorithms`):
it trains each model with Adam (one-cycle LR schedule, batch {BATCH_SIZE}), exports all files,
re-loads every file it wrote (onnxruntime for `.onnx`, `torch.jit.load`, `torch.export.load(...).module()`,
and the state dict into a fresh model), evaluates test accuracy, and regenerates this README.
Training takes a few seconds per model on a CPU.

## Results

Test-set accuracy ({n_test} samples) measured on the re-loaded files
(the re-loaded state dicts give the same accuracy as the eager models):

{table}

ONNX operator types per model:

{ops}
"""
    (HERE / "README.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    _reexec_with_fixed_hash_seed()
    sys.exit(main())
