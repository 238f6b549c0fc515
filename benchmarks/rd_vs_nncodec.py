"""Rate-distortion of nnc against NNCodec 2.1.3 (the MPEG NNC reference software) on the same tensors.

    python benchmarks/rd_vs_nncodec.py [--models mlp lenet resnet mobilenet resnet18] [--quick]
                                       [--json out.json] [--plot rd.png] [--nncodec-python PATH]

NNCodec runs in its own virtual environment (it needs numpy<2): create it once with
`bash benchmarks/setup_nncodec.sh`; this script finds it at $NNCODEC_VENV or /tmp/nncodec-venv, or
takes --nncodec-python. It talks to NNCodec only through benchmarks/nncodec_worker.py (a
subprocess); nncodec is never imported here. --no-nncodec runs our coder alone.

For every model and QP:
  - ours: our encoder's own path, as `nnc encode --qp QP --calib sample_models/digits_calib.npz`
    runs it (nnc_tool.prepare_model + compress_model): BatchNorm folded into the convolutions,
    the quantization plan, coding; then decompress_model and write_model to ONNX. The plan
    follows the default `--calib-mode auto`: the sample models get "full" calibration (per-tensor
    QPs from sensitivities measured on the calibration inputs, GPTQ on measured layer Hessians),
    ResNet-18 (over 2 M parameters) "fast" calibration (Kronecker GPTQ on channel moments measured
    in one pass, data-free allocation). Non-weight tensors use our default QP (16 below the weight
    QP). `--data-free` drops the calibration data (the data-free allocation proxy, error feedback
    on BatchNorm-estimated instead of measured statistics). Our bitstream is self-contained: it
    also holds the graph (topology) and any EXACT tensor.
  - Times: our encode (everything after reading the model) and decode are the median of
    OUR_TIMING_RUNS runs (a 0.6 s run on this shared 2-core machine varies by 10-20 % from run
    to run); NNCodec's 1-15 s runs are timed once.
  - NNCodec: the same float32 tensors our reader classes as WEIGHT or NONWEIGHT (EXACT tensors are
    part of neither coder's weight payload) go to nncodec.nn.encode with its default settings
    (DeepCABAC, dependent quantization, qp_density 2, nonweight_qp -75, row skipping, param_opt)
    at weight QP; its reconstruction replaces those tensors in the original ONNX model.
  - Both rebuilt models are evaluated identically in onnxruntime (1 thread) on
    sample_models/digits_test.npz: top-1 accuracy and the output SNR (dB) of the logits against
    the original model's logits.
Bytes: "total" is our whole bitstream (header, parameter set, topology, every tensor); "weights"
is our data units of WEIGHT and NONWEIGHT tensors only (each with its framing, name, shape, QP and
histogram). NNCodec's bitstream holds exactly those tensors (names, shapes and QPs included) and
no graph, so its one size is both its "weights" and its "total"; the graph would have to travel
out of band. BD-rates are given for both of our sizes; negative means we need fewer bytes.

BD-rate: Bjøntegaard delta rate of ours against NNCodec, with output SNR (dB) as the quality:
log(rate) as a function of quality is fitted per coder (the classic cubic polynomial, and the
piecewise-cubic Hermite interpolation that JVET/VCEG recommend nowadays), integrated over the
quality range both curves cover, and the mean log-rate difference turned into a percentage.
Dominated points (not better than a cheaper point of the same coder) are left out of the fits.
"useful" repeats the SNR BD-rate on the points whose accuracy is within 1 point of the original
model's (the operating range that matters; the full sweep reaches broken models at coarse QPs).
"wSNR" uses the weight-domain SNR of the WEIGHT tensors as the quality instead: a smoother
measure of quantizer + entropy coder efficiency than the output SNR on 450 images.
The same with top-1 accuracy is reported when both accuracy curves keep at least four such points
(usually not: on 450 test images accuracy saturates and moves in steps of 0.22 points).

Models: the four bundled sample models, and "resnet18": the torchvision ResNet-18 layout
(BasicBlock [2, 2, 2, 2], 64-512 channels, 7x7 stem, ~11.2 M parameters) in plain torch with a
1-channel input and 10 classes, whose first op upsamples the 8x8 digits bilinearly to 64x64 (at
32x32 layer4 would run on 1x1 maps, where its 3x3 kernels' outer taps never see a pixel and
never train). It is trained briefly on the digits training split (10 epochs of SGD, seeded,
1 thread, ~8 minutes) and cached as benchmarks/.cache/resnet18_digits_v2.onnx. Caveat: with
~1350 training images the weights move little from their Kaiming-normal initialisation, so they
are closer to Gaussian than ImageNet-trained ResNet-18 weights; the script prints their excess
kurtosis.

The script also prints where the bytes go at one matched operating point per model (our QP -38
and the NNCodec QP of nearest output SNR): container and topology, per-tensor headers, histogram
side information, entropy-coded payload of weight and non-weight tensors, against NNCodec's units.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bdrate import bd_rate  # noqa: E402

import nnc_tool  # noqa: E402
from nnc_tool.bench.runner import compare_outputs, load_eval_data, make_runner, predict
from nnc_tool.coding.report import stream_entropy_report
from nnc_tool.model import TensorRole

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
CACHE = Path(__file__).resolve().parent / ".cache"
WORKER = Path(__file__).resolve().parent / "nncodec_worker.py"
DATA = SAMPLES / "digits_test.npz"
CALIB = SAMPLES / "digits_calib.npz"  # 256 training images, disjoint from the test images
SAMPLE_MODELS = ("mlp", "lenet", "resnet", "mobilenet")
ALL_MODELS = (*SAMPLE_MODELS, "resnet18")
RESNET18_FILE = "resnet18_digits_v2.onnx"
RESNET18_SIZE = 64  # input side after upsampling the 8x8 digits

# Our QP and NNCodec's QP give different qualities (NNCodec's dependent quantization with the same
# QP reconstructs on a grid about twice as coarse per quantizer), so NNCodec's sweep starts and ends
# a little higher to cover the same SNR range.
# Output SNR on 450 test images is a noisy function of QP for the small models, so they get a QP
# step of 2 (cheap); resnet18 gets 4.
# Our encode and decode times are the median of this many runs (see the module docstring).
OUR_TIMING_RUNS = 3
OURS_QPS = list(range(-50, -17, 4))
NNCODEC_QPS = list(range(-50, -13, 4))
DENSE_OURS_QPS = list(range(-50, -17, 2))
DENSE_NNCODEC_QPS = list(range(-50, -13, 2))
QUICK_OURS_QPS = list(range(-50, -17, 8))
QUICK_NNCODEC_QPS = list(range(-46, -13, 8))
MATCH_QP = -38
USEFUL_ACCURACY_DROP = 1.0  # "useful" BD-rate: only points within this many accuracy points of the original


@dataclass
class Point:
    model: str
    coder: str
    qp: int
    bytes: int  # total
    weight_bytes: int
    snr_db: float
    accuracy: float
    encode_s: float
    decode_s: float
    weight_snr_db: float


@dataclass
class ModelResult:
    model: str
    parameters: int
    coded_parameters: int
    accuracy_original: float
    points: list[Point] = field(default_factory=list)
    bd_rate: dict = field(default_factory=dict)
    breakdown: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# BD-rate
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# ResNet-18
# --------------------------------------------------------------------------------------------


def build_resnet18(path: Path, epochs: int = 10, log=print) -> dict:
    """Train the digits ResNet-18 and export it to ONNX at `path`; returns training facts."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(out)) + identity)

    class ResNet18(nn.Module):
        """torchvision.models.resnet18's layout and init, 1 input channel, 10 classes."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
            for i, (cin, cout, stride) in enumerate(widths, start=1):
                setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            self.fc = nn.Linear(512, 10)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x):
            x = F.interpolate(x, size=(RESNET18_SIZE, RESNET18_SIZE), mode="bilinear", align_corners=False)
            x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    digits = load_digits()
    x = (digits.images.astype(np.float32) / np.float32(16.0))[:, None]
    y = digits.target.astype(np.int64)
    x_train, _, y_train, _ = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x_train)), torch.from_numpy(y_train)
    model = ResNet18()
    batch = 64
    steps = epochs * ((len(xt) + batch - 1) // batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=steps)
    gen = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), batch):
            idx = perm[i : i + batch]
            if len(idx) < 2:
                continue
            # +-1 pixel random shift of the 8x8 digit (zero padding) as light augmentation.
            shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
            xb = torch.roll(F.pad(xt[idx], (1, 1, 1, 1)), shifts=shift, dims=(2, 3))[:, :, 1:-1, 1:-1]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yt[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        log(f"  resnet18 epoch {epoch + 1}/{epochs}: loss {total / len(xt):.4f} ({time.perf_counter() - started:.0f} s)")
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(2, 1, 8, 8),),
            str(tmp),
            dynamo=False,
            export_params=True,
            opset_version=17,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.EVAL,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    _undo_initializer_dedup(tmp)
    os.replace(tmp, path)
    torch.set_num_threads(threads)
    facts = {"epochs": epochs, "train_seconds": time.perf_counter() - started, "train_samples": len(xt)}
    path.with_suffix(".json").write_text(json.dumps(facts, indent=1))
    return facts


def _undo_initializer_dedup(path: Path) -> None:
    """Give every parameter its own named initializer again (as sample_models/build.py does).

    The legacy exporter merges bit-identical initializers and recreates the duplicates through
    Identity nodes; in a ResNet the residual-branch and shortcut BN biases get identical gradients
    and end up identical. Our reader would then class the shared tensor as EXACT.
    """
    import onnx

    proto = onnx.load(str(path))
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    keep, changed = [], False
    for node in graph.node:
        if node.op_type == "Identity" and len(node.input) == 1 and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
            inits[copy.name] = copy
            changed = True
        else:
            keep.append(node)
    if changed:
        del graph.node[:]
        graph.node.extend(keep)
        onnx.save(proto, str(path))


def model_path(name: str, log=print) -> Path:
    if name in SAMPLE_MODELS:
        return SAMPLES / f"{name}.onnx"
    if name == "resnet18":
        path = CACHE / RESNET18_FILE
        if not path.exists():
            log(f"building {path.relative_to(ROOT)} (trains ResNet-18 on digits, a few minutes on 1 core)")
            build_resnet18(path, log=log)
        return path
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(ALL_MODELS)}")


def excess_kurtosis(model: nnc_tool.Model) -> float:
    """Parameter-weighted mean excess kurtosis of the WEIGHT tensors (0 for a Gaussian, 3 for a Laplacian)."""
    values, weights = [], []
    for t in model.tensors:
        if t.role == TensorRole.WEIGHT and t.array.size > 100:
            a = t.array.astype(np.float64).ravel()
            a = a - a.mean()
            values.append(float((a**4).mean() / (a**2).mean() ** 2 - 3.0))
            weights.append(a.size)
    return float(np.average(values, weights=weights)) if values else float("nan")


# --------------------------------------------------------------------------------------------
# Evaluation and coders
# --------------------------------------------------------------------------------------------


class Evaluator:
    """Runs a model in onnxruntime on the test set and compares it with the original's logits."""

    def __init__(self, original: nnc_tool.Model, original_path: Path, x: np.ndarray, y: np.ndarray) -> None:
        self.original = original
        self.x, self.y = x, y
        self.reference = predict(make_runner(original_path, "onnx", threads=1), x)
        self.accuracy_original = 100.0 * float((self.reference.argmax(1) == y).mean())

    def __call__(self, rebuilt: nnc_tool.Model, tmp: Path, reference: nnc_tool.Model | None = None) -> tuple[float, float, float]:
        """(output SNR dB, top-1 accuracy %, weight-domain SNR dB over the WEIGHT tensors).

        `reference` is the unquantized model the rebuilt weights approximate (ours: the model
        with BatchNorm folded in), default the original.
        """
        path = tmp / "rebuilt.onnx"
        nnc_tool.write_model(rebuilt, path)
        logits = predict(make_runner(path, "onnx", threads=1), self.x)
        stats = compare_outputs(self.reference, logits, self.y)
        rebuilt_map = rebuilt.tensor_map()
        signal = noise = 0.0
        for t in (reference or self.original).tensors:
            if t.role == TensorRole.WEIGHT and t.name in rebuilt_map:
                a = t.array.astype(np.float64)
                signal += float((a**2).sum())
                noise += float(((a - rebuilt_map[t.name].array.astype(np.float64)) ** 2).sum())
        weight_snr = float("inf") if noise == 0 else 10.0 * np.log10(signal / noise)
        return stats.output_snr_db, stats.accuracy_rebuilt, weight_snr


def run_ours(name: str, model: nnc_tool.Model, evaluate: Evaluator, qps: list[int], nonweight_qp: int | None,
             calibration: np.ndarray | None, tmp: Path, log, dependent: bool = False) -> tuple[list[Point], dict]:
    """Our encoder's own path (what `nnc encode [--calib]` does after reading the model):
    nnc_tool.prepare_model (BatchNorm statistics read, fast calibration's measuring pass, folding)
    and compress_model (the quantization plan, coding). Encode time covers all of it (median of
    OUR_TIMING_RUNS; the runs must give the same bitstream)."""
    points, streams = [], {}
    for qp in qps:
        options = nnc_tool.EncodeOptions(qp=qp, nonweight_qp=nonweight_qp, dependent=dependent)
        encode_times, decode_times, outputs = [], [], set()
        for _ in range(OUR_TIMING_RUNS):
            started = time.perf_counter()
            prepared = nnc_tool.prepare_model(model, options, calibration)
            folded = prepared.model
            data, reports = nnc_tool.compress_model(
                folded, options, calibration=calibration, moments=prepared.moments, plan_cache=prepared.plan_cache
            )
            encode_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            rebuilt = nnc_tool.decompress_model(data)
            decode_times.append(time.perf_counter() - started)
            outputs.add(data)
        if len(outputs) != 1:
            raise RuntimeError(f"{name} qp {qp}: repeated encodes gave different bitstreams")
        encode_s, decode_s = float(np.median(encode_times)), float(np.median(decode_times))
        weight_bytes = sum(r.coded_bytes for r in reports if r.role in ("weight", "nonweight"))
        snr, acc, wsnr = evaluate(rebuilt, tmp, reference=folded)
        points.append(Point(name, "nnc", qp, len(data), weight_bytes, snr, acc, encode_s, decode_s, wsnr))
        streams[qp] = data
        log(f"  nnc     qp {qp:4d}: {len(data):10d} B  SNR {snr:6.2f} dB  acc {acc:6.2f} %  enc {encode_s:6.2f} s  dec {decode_s:6.2f} s")
    return points, streams


def run_nncodec(name: str, model: nnc_tool.Model, evaluate: Evaluator, qps: list[int], nonweight_qp: int, python: str, tmp: Path, log) -> tuple[list[Point], dict]:
    coded = [t for t in model.tensors if t.role != TensorRole.EXACT]
    params = tmp / "params.npz"
    np.savez(params, **{t.name: np.ascontiguousarray(t.array, dtype=np.float32) for t in coded})
    out_dir = tmp / "nncodec"
    cmd = [python, str(WORKER), str(params), str(out_dir), "--qp", *map(str, qps), "--nonweight-qp", str(nonweight_qp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"NNCodec worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    points, units = [], {}
    for res in report["results"]:
        with np.load(res["output"]) as rec:
            tensors = []
            for t in model.tensors:
                if t.role == TensorRole.EXACT:
                    tensors.append(t)
                else:
                    tensors.append(nnc_tool.Tensor(t.name, rec[t.name].astype(t.array.dtype).reshape(t.array.shape), t.role))
        rebuilt = nnc_tool.Model(model.format, model.topology, tensors, dict(model.metadata))
        snr, acc, wsnr = evaluate(rebuilt, tmp)
        qp = res["qp"]
        points.append(Point(name, "nncodec", qp, res["bytes"], res["bytes"], snr, acc, res["encode_s"], res["decode_s"], wsnr))
        units[qp] = res["units"]
        log(f"  nncodec qp {qp:4d}: {res['bytes']:10d} B  SNR {snr:6.2f} dB  acc {acc:6.2f} %  enc {res['encode_s']:6.2f} s  dec {res['decode_s']:6.2f} s")
    return points, {"units": units, "settings": report["settings"], "version": report["nncodec_version"]}


# --------------------------------------------------------------------------------------------
# Where the bytes go
# --------------------------------------------------------------------------------------------


def our_breakdown(data: bytes) -> dict:
    """Split one of our bitstreams into container/topology, tensor headers, side info and payload."""
    report = stream_entropy_report(data)
    out = {
        "container_and_topology": report["container_bytes"],
        "unit_framing": 0,
        "tensor_headers": 0,
        "histogram_side_info": 0,
        "payload_weight": 0,
        "payload_nonweight": 0,
        "exact_tensors": 0,
        "ideal_payload": report["ideal_payload_bytes"],
        "overhead_percent": report["overhead_percent"],
        "per_tensor": [],
    }
    for row in report["tensors"]:
        if row["role"] == "exact" or row["coding"] != "quantized":
            out["exact_tensors" if row["role"] == "exact" else "payload_nonweight"] += row["unit_bytes"]
            continue
        out["unit_framing"] += row["framing_bytes"]
        out["tensor_headers"] += row["name_bytes"] + row["header_bytes"]
        out["histogram_side_info"] += row["model_bytes"]
        out["payload_weight" if row["role"] == "weight" else "payload_nonweight"] += row["payload_bytes"]
        out["per_tensor"].append(
            {"name": row["name"], "role": row["role"], "size": row["values"], "bytes": row["unit_bytes"],
             "method": "+".join(sorted(row["methods"])), "side_info": row["model_bytes"],
             "header": row["framing_bytes"] + row["name_bytes"] + row["header_bytes"]}
        )
    return out


def breakdown(result: ModelResult, model: nnc_tool.Model, ours: dict, nncodec: dict | None) -> dict:
    ours_points = {p.qp: p for p in result.points if p.coder == "nnc"}
    qp = MATCH_QP if MATCH_QP in ours_points else sorted(ours_points)[len(ours_points) // 2]
    mine = our_breakdown(ours[qp])
    info = {"ours_qp": qp, "ours_snr_db": ours_points[qp].snr_db, "ours": {k: v for k, v in mine.items() if k != "per_tensor"}}
    roles = [t.role for t in model.tensors if t.role != TensorRole.EXACT]
    names = [t.name for t in model.tensors if t.role != TensorRole.EXACT]
    per_tensor = {row["name"]: row for row in mine["per_tensor"]}
    if nncodec is not None:
        theirs_points = [p for p in result.points if p.coder == "nncodec"]
        match = min(theirs_points, key=lambda p: abs(p.snr_db - ours_points[qp].snr_db))
        units = nncodec["units"][match.qp]
        sizes = units["ndu_sizes"]
        info["nncodec_qp"] = match.qp
        info["nncodec_snr_db"] = match.snr_db
        info["nncodec"] = {
            "start_mps_tpl": units.get("start", 0) + units.get("mps", 0) + units.get("tpl", 0),
            "ndu_weight": int(sum(s for s, r in zip(sizes, roles) if r == TensorRole.WEIGHT)),
            "ndu_nonweight": int(sum(s for s, r in zip(sizes, roles) if r == TensorRole.NONWEIGHT)),
        }
        if len(sizes) == len(names):
            for name, size in zip(names, sizes):
                if name in per_tensor:
                    per_tensor[name]["nncodec_bytes"] = int(size)
    info["per_tensor"] = list(per_tensor.values())
    return info


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def matched_speed(ours: list[Point], theirs: list[Point], accuracy_floor: float) -> list[dict]:
    """Our encode/decode time at each NNCodec point's output SNR (linear in SNR between our two
    nearest points), for the NNCodec points inside our SNR range; `useful` marks points whose
    accuracy is within USEFUL_ACCURACY_DROP of the original's."""
    ordered = sorted(ours, key=lambda p: p.snr_db)
    snrs = np.array([p.snr_db for p in ordered])
    rows = []
    for p in sorted(theirs, key=lambda p: -p.snr_db):
        if not snrs[0] <= p.snr_db <= snrs[-1]:
            continue
        enc = float(np.interp(p.snr_db, snrs, [q.encode_s for q in ordered]))
        dec = float(np.interp(p.snr_db, snrs, [q.decode_s for q in ordered]))
        rows.append({
            "nncodec_qp": p.qp, "snr_db": p.snr_db, "useful": p.accuracy >= accuracy_floor,
            "nncodec_encode_s": p.encode_s, "nncodec_decode_s": p.decode_s, "nnc_encode_s": enc, "nnc_decode_s": dec,
            "encode_ratio": enc / p.encode_s, "decode_ratio": dec / p.decode_s,
        })
    return rows


def print_table(results: list[ModelResult]) -> None:
    print()
    print(f"{'model':<10} {'coder':<8} {'qp':>4} {'bytes':>10} {'wt bytes':>10} {'SNR dB':>7} {'acc %':>6} {'wSNR dB':>7} {'enc s':>7} {'dec s':>7}")
    for result in results:
        for p in result.points:
            print(
                f"{p.model:<10} {p.coder:<8} {p.qp:>4} {p.bytes:>10} {p.weight_bytes:>10} {p.snr_db:>7.2f} {p.accuracy:>6.2f} "
                f"{p.weight_snr_db:>7.2f} {p.encode_s:>7.3f} {p.decode_s:>7.3f}"
            )
    print()
    print("BD-rate of nnc vs NNCodec (negative = nnc needs fewer bytes for the same quality)")
    print("  columns: quality metric, bytes counted (wt = our weight units, total = our whole bitstream), fit")
    print(f"  'useful': only points whose accuracy is within {USEFUL_ACCURACY_DROP:g} point of the original's")
    print(f"{'model':<10} {'params':>10} {'SNR,wt pchip':>13} {'SNR,wt cubic':>13} {'SNR,wt useful':>14} {'SNR,total':>10} {'wSNR,wt':>8} {'acc,wt':>8} {'SNR range dB':>14}  time nnc/NNCodec enc, dec (sum over sweep)")
    for r in results:
        bd = r.bd_rate

        def fmt(v):
            return f"{v:+.1f}%" if isinstance(v, float) else "n/a"

        rng = bd.get("snr_range_db")
        rng_s = f"{rng[0]:.1f}-{rng[1]:.1f}" if rng else "n/a"
        t = bd.get("time", {})
        times = f"{t.get('nnc_enc', 0):.2f}/{t.get('nncodec_enc', 0):.2f} s, {t.get('nnc_dec', 0):.2f}/{t.get('nncodec_dec', 0):.2f} s" if t else ""
        print(
            f"{r.model:<10} {r.parameters:>10} {fmt(bd.get('snr_weights_pchip')):>13} {fmt(bd.get('snr_weights_cubic')):>13} {fmt(bd.get('snr_weights_useful_pchip')):>14} "
            f"{fmt(bd.get('snr_total_pchip')):>10} {fmt(bd.get('weight_snr_weights_pchip')):>8} {fmt(bd.get('accuracy_weights_pchip')):>8} {rng_s:>14}  {times}"
        )
    speed = [r for r in results if r.bd_rate.get("matched_speed")]
    if speed:
        print()
        print("Speed at equal output SNR (ours interpolated at each NNCodec point's SNR; * = accuracy within"
              f" {USEFUL_ACCURACY_DROP:g} point of the original)")
        print(f"{'model':<10} {'NNCodec qp':>10} {'SNR dB':>7} {'NNCodec enc/dec s':>18} {'nnc enc/dec s':>14} {'enc ratio':>9} {'dec ratio':>9}")
        for r in speed:
            for row in r.bd_rate["matched_speed"]:
                mark = "*" if row["useful"] else " "
                print(
                    f"{r.model:<10} {row['nncodec_qp']:>9}{mark} {row['snr_db']:>7.2f} "
                    f"{row['nncodec_encode_s']:>8.2f} / {row['nncodec_decode_s']:<7.2f} {row['nnc_encode_s']:>5.2f} / {row['nnc_decode_s']:<5.2f} "
                    f"{row['encode_ratio']:>8.3f}x {row['decode_ratio']:>8.3f}x"
                )
    print()
    print(f"Where the bytes go (our QP {MATCH_QP}, or mid-sweep if absent, vs NNCodec at the QP of nearest output SNR):")
    for r in results:
        b = r.breakdown
        if not b:
            continue
        o = b["ours"]
        line = (
            f"  {r.model}: nnc qp {b['ours_qp']} ({b['ours_snr_db']:.1f} dB): container+topology {o['container_and_topology']}, "
            f"unit framing {o['unit_framing']}, tensor headers {o['tensor_headers']}, histograms {o['histogram_side_info']}, "
            f"weight payload {o['payload_weight']}, non-weight payload {o['payload_nonweight']}, exact {o['exact_tensors']}"
            f" (bitstream within {o['overhead_percent']:.2f} % of its models' entropy + side information)"
        )
        print(line)
        if "nncodec" in b:
            n = b["nncodec"]
            print(
                f"  {' ' * len(r.model)}  NNCodec qp {b['nncodec_qp']} ({b['nncodec_snr_db']:.1f} dB): STR+MPS+TPL {n['start_mps_tpl']}, "
                f"weight NDUs {n['ndu_weight']}, non-weight NDUs {n['ndu_nonweight']}"
            )
    for r in results:
        for note in r.notes:
            print(f"  note ({r.model}): {note}")


def plot(results: list[ModelResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.ticker
    import matplotlib.pyplot as plt

    n = len(results)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
    for ax, r in zip(axes.ravel(), results):
        for coder, key, style, label in (
            ("nnc", "weight_bytes", "o-", "nnc (weights)"),
            ("nnc", "bytes", "o:", "nnc (total, with topology)"),
            ("nncodec", "bytes", "s-", "NNCodec 2.1.3"),
        ):
            pts = sorted((p for p in r.points if p.coder == coder), key=lambda p: getattr(p, key))
            if pts:
                ax.plot([getattr(p, key) / 1024 for p in pts], [p.snr_db for p in pts], style, label=label, markersize=4)
        bd = r.bd_rate.get("snr_weights_pchip")
        title = f"{r.model} ({r.parameters / 1e6:.2f} M params)" if r.parameters > 1e6 else f"{r.model} ({r.parameters} params)"
        useful = r.bd_rate.get("snr_weights_useful_pchip")
        if isinstance(bd, float):
            title += f"\nBD-rate nnc vs NNCodec: {bd:+.1f} %"
            if isinstance(useful, float) and abs(useful - bd) >= 0.05:
                title += f" (useful range {useful:+.1f} %)"
        ax.set_title(title, fontsize=10)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "235" else ""))
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("bitstream size (KiB, log)")
        ax.set_ylabel("output SNR vs original (dB)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def find_nncodec_python(explicit: str | None) -> str | None:
    candidates = [explicit] if explicit else []
    venv = os.environ.get("NNCODEC_VENV")
    if venv:
        candidates.append(str(Path(venv) / "bin" / "python"))
    candidates.append("/tmp/nncodec-venv/bin/python")
    for c in candidates:
        if c and Path(c).exists():
            return c
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=ALL_MODELS, help="default: all (with --quick: the four sample models)")
    parser.add_argument("--quick", action="store_true", help="half as many QPs; resnet18 only if named in --models")
    parser.add_argument("--nonweight-qp", type=int, default=-75, help="NNCodec's QP of 1-D tensors (default -75, its default)")
    parser.add_argument("--ours-nonweight-qp", type=int, default=None, help="our QP of 1-D tensors (default: ours, 16 below the weight QP)")
    parser.add_argument("--calib", type=Path, default=CALIB, help=f"calibration inputs for our encoder (default {CALIB.relative_to(ROOT)})")
    parser.add_argument("--data-free", action="store_true", help="encode without calibration data (data-free allocation; GPTQ on BatchNorm-estimated channel covariances and kernel feedback instead of measured Hessians)")
    parser.add_argument("--dq", action="store_true", help="our encoder with dependent (trellis) quantization (`nnc encode --dq`)")
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--plot", type=Path, default=CACHE / "rd_vs_nncodec.png", help="PNG of rate vs output SNR (default benchmarks/.cache/rd_vs_nncodec.png)")
    parser.add_argument("--nncodec-python", help="python of the NNCodec venv (default $NNCODEC_VENV/bin/python or /tmp/nncodec-venv/bin/python)")
    parser.add_argument("--no-nncodec", action="store_true", help="run our coder alone")
    args = parser.parse_args(argv)

    models = args.models or (list(SAMPLE_MODELS) if args.quick else list(ALL_MODELS))
    python = None
    if not args.no_nncodec:
        python = find_nncodec_python(args.nncodec_python)
        if python is None:
            print("NNCodec venv not found: run `bash benchmarks/setup_nncodec.sh` (or pass --nncodec-python / --no-nncodec)", file=sys.stderr)
            return 2

    def log(msg: str) -> None:
        print(msg, flush=True)

    x, y = load_eval_data(DATA)
    calibration = None if args.data_free else load_eval_data(args.calib)[0]
    results: list[ModelResult] = []
    for name in models:
        path = model_path(name, log)
        model = nnc_tool.read_model(path)
        evaluate = Evaluator(model, path, x, y)
        coded = sum(t.array.size for t in model.tensors if t.role != TensorRole.EXACT)
        result = ModelResult(name, model.parameter_count, coded, evaluate.accuracy_original)
        if args.quick:
            ours_qps, nncodec_qps = QUICK_OURS_QPS, QUICK_NNCODEC_QPS
        elif coded > 1_000_000:
            ours_qps, nncodec_qps = OURS_QPS, NNCODEC_QPS
        else:
            ours_qps, nncodec_qps = DENSE_OURS_QPS, DENSE_NNCODEC_QPS
        log(f"{name}: {model.parameter_count} parameters ({coded} coded by both), original accuracy {evaluate.accuracy_original:.2f} %, "
            f"weight excess kurtosis {excess_kurtosis(model):.2f}")
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            ours_points, streams = run_ours(name, model, evaluate, ours_qps, args.ours_nonweight_qp, calibration, tmp, log, args.dq)
            result.points += ours_points
            nncodec_info = None
            if python is not None:
                try:
                    theirs, nncodec_info = run_nncodec(name, model, evaluate, nncodec_qps, args.nonweight_qp, python, tmp, log)
                    result.points += theirs
                except RuntimeError as err:
                    result.notes.append(str(err))
                    log(str(err))
            result.breakdown = breakdown(result, model, streams, nncodec_info)
        ours_p = [p for p in result.points if p.coder == "nnc"]
        theirs_p = [p for p in result.points if p.coder == "nncodec"]
        if theirs_p:
            bd = result.bd_rate
            for label, key in (("weights", "weight_bytes"), ("total", "bytes")):
                for method in ("pchip", "cubic"):
                    bd[f"snr_{label}_{method}"] = bd_rate(
                        [getattr(p, key) for p in ours_p], [p.snr_db for p in ours_p],
                        [p.bytes for p in theirs_p], [p.snr_db for p in theirs_p], method,
                    )
                bd[f"weight_snr_{label}_pchip"] = bd_rate(
                    [getattr(p, key) for p in ours_p], [p.weight_snr_db for p in ours_p],
                    [p.bytes for p in theirs_p], [p.weight_snr_db for p in theirs_p], "pchip",
                )
                bd[f"accuracy_{label}_pchip"] = bd_rate(
                    [getattr(p, key) for p in ours_p], [p.accuracy for p in ours_p],
                    [p.bytes for p in theirs_p], [p.accuracy for p in theirs_p], "pchip",
                )
            # The operating range that matters: points whose accuracy is within 1 point of the original.
            floor = result.accuracy_original - USEFUL_ACCURACY_DROP
            ours_u = [p for p in ours_p if p.accuracy >= floor]
            theirs_u = [p for p in theirs_p if p.accuracy >= floor]
            bd["snr_weights_useful_pchip"] = bd_rate(
                [p.weight_bytes for p in ours_u], [p.snr_db for p in ours_u],
                [p.bytes for p in theirs_u], [p.snr_db for p in theirs_u], "pchip",
            )
            low = max(min(p.snr_db for p in ours_p), min(p.snr_db for p in theirs_p))
            high = min(max(p.snr_db for p in ours_p), max(p.snr_db for p in theirs_p))
            bd["snr_range_db"] = [low, high] if high > low else None
            bd["matched_speed"] = matched_speed(ours_p, theirs_p, floor)
            bd["time"] = {
                "nnc_enc": sum(p.encode_s for p in ours_p), "nnc_dec": sum(p.decode_s for p in ours_p),
                "nncodec_enc": sum(p.encode_s for p in theirs_p), "nncodec_dec": sum(p.decode_s for p in theirs_p),
            }
            if nncodec_info is not None:
                result.breakdown["nncodec_settings"] = nncodec_info["settings"]
                result.breakdown["nncodec_version"] = nncodec_info["version"]
        if name == "resnet18":
            result.notes.append(f"weights' parameter-weighted excess kurtosis {excess_kurtosis(model):.2f} (0 Gaussian, 3 Laplacian)")
        results.append(result)

    print_table(results)
    if args.plot:
        plot(results, args.plot)
        print(f"\nplot: {args.plot}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1, default=float))
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
