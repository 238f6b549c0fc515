"""Small, seeded ONNX models for tests.

Every `build_*` takes a directory (created if needed), writes one model there and returns its
path. `sample_inputs(path)` makes seeded feeds for any of them. The tensor names the builders use
are listed in `EXPECTED_ROLES`, so tests (and end-to-end tests elsewhere) can assert roles.
"""
from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nnc_tool.model import TensorRole

OPSET = 18
IR_VERSION = 9  # old enough for the onnxruntime releases we support, new enough for opset 18

W, N, E = TensorRole.WEIGHT, TensorRole.NONWEIGHT, TensorRole.EXACT


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="nnc-tests",
        producer_version="1.0",
        doc_string="built by tests/onnx_factory.py",
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {"author": "nnc tests", "purpose": "round trip"})
    return model


def _save(model: onnx.ModelProto, directory: Path, name: str) -> Path:
    onnx.checker.check_model(model, full_check=True)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    onnx.save_model(model, path)
    return path


def _as(array: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    return np.asarray(array, dtype=np.float32).astype(dtype)


def _conv_bn_gemm(as_constants: bool, elem: int, dtype: np.dtype | type) -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv -> BatchNorm -> Relu -> Reshape[1,-1] -> Gemm -> y[1,10]."""
    rng = np.random.default_rng(1)
    floats = {
        "conv.weight": rng.standard_normal((8, 3, 3, 3)) * 0.3,
        "conv.bias": rng.standard_normal(8) * 0.1,
        "bn.scale": 1.0 + rng.standard_normal(8) * 0.1,
        "bn.bias": rng.standard_normal(8) * 0.1,
        "bn.mean": rng.standard_normal(8) * 0.1,
        "bn.var": 0.5 + rng.random(8),
        "fc.weight": rng.standard_normal((10, 512)) * 0.05,
        "fc.bias": rng.standard_normal(10) * 0.1,
    }
    tensors = [numpy_helper.from_array(_as(v, dtype), k) for k, v in floats.items()]
    tensors.append(numpy_helper.from_array(np.array([1, -1], np.int64), "flatten.shape"))
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b"], name="bn", epsilon=1e-5
        ),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "flatten.shape"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], name="fc", transB=1),
    ]
    initializers = tensors
    if as_constants:
        nodes = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t) for t in tensors] + nodes
        initializers = []
    graph = helper.make_graph(
        nodes,
        "conv_bn_gemm",
        [helper.make_tensor_value_info("x", elem, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", elem, [1, 10])],
        initializers,
        doc_string="conv + batchnorm + gemm",
    )
    return _model(graph)


def build_conv_bn_gemm(directory: Path) -> Path:
    """Conv+BN+Relu+Gemm, weights as graph initializers."""
    return _save(_conv_bn_gemm(False, TensorProto.FLOAT, np.float32), directory, "conv_bn_gemm.onnx")


def build_conv_bn_gemm_constants(directory: Path) -> Path:
    """The same model with every weight in a Constant node (as some exporters emit)."""
    return _save(_conv_bn_gemm(True, TensorProto.FLOAT, np.float32), directory, "conv_bn_gemm_constants.onnx")


def build_fp16(directory: Path) -> Path:
    """The Conv+BN+Gemm model entirely in float16 (inputs, weights, outputs)."""
    return _save(_conv_bn_gemm(False, TensorProto.FLOAT16, np.float16), directory, "fp16.onnx")


def build_external_data(directory: Path) -> Path:
    """The Conv+BN+Gemm model with its tensors of 256+ bytes in an external file named 'weights.bin'."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = _conv_bn_gemm(False, TensorProto.FLOAT, np.float32)
    onnx.checker.check_model(model, full_check=True)
    (directory / "weights.bin").unlink(missing_ok=True)  # onnx appends to an existing data file
    path = directory / "external.onnx"
    onnx.save_model(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=256,  # the int64 Reshape shape stays inline: shape inference cannot read external data
    )
    return path


def build_bf16(directory: Path) -> Path:
    """x[2,16] -> MatMul -> Add -> y in bfloat16 (onnxruntime's CPU provider cannot run it)."""
    rng = np.random.default_rng(2)
    inits = [
        numpy_helper.from_array(_as(rng.standard_normal((16, 8)) * 0.2, ml_dtypes.bfloat16), "lin.weight"),
        numpy_helper.from_array(_as(rng.standard_normal(8) * 0.1, ml_dtypes.bfloat16), "lin.bias"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "lin.weight"], ["m"], name="matmul"),
        helper.make_node("Add", ["m", "lin.bias"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "bf16",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 8])],
        inits,
    )
    return _save(_model(graph), directory, "bf16.onnx")


def build_if_subgraph(directory: Path) -> Path:
    """An If whose branches hold their own weights and use an outer-scope one.

    cond = ReduceSum(x) > zero; then: x @ w(then-branch initializer, shadows the main 'w')
    + then.bias (Constant); else: (x @ else.w (Constant)) @ outer.w (main-graph initializer used
    only inside the branch). After the If: @ w (main) + head.bias. Positive inputs take 'then'.
    """
    rng = np.random.default_rng(3)

    def f32(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    then_graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["then.bias"], value=numpy_helper.from_array(f32(4))),
            helper.make_node("MatMul", ["x", "w"], ["t1"]),
            helper.make_node("Add", ["t1", "then.bias"], ["t_out"]),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(f32(4, 4), "w")],
    )
    else_graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["else.w"], value=numpy_helper.from_array(f32(4, 4))),
            helper.make_node("MatMul", ["x", "else.w"], ["e1"]),
            helper.make_node("MatMul", ["e1", "outer.w"], ["e_out"]),
        ],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [1, 4])],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="greater"),
        helper.make_node("If", ["cond"], ["z"], name="gate", then_branch=then_graph, else_branch=else_graph),
        helper.make_node("MatMul", ["z", "w"], ["h"], name="head"),
        helper.make_node("Add", ["h", "head.bias"], ["y"], name="head_bias"),
    ]
    inits = [
        numpy_helper.from_array(f32(4, 4), "w"),
        numpy_helper.from_array(f32(4, 4), "outer.w"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(f32(4), "head.bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "if_subgraph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        inits,
    )
    return _save(_model(graph), directory, "if_subgraph.onnx")


def build_loop(directory: Path) -> Path:
    """A 3-step Loop: h = Clip(tanh(h @ rnn.w + loop.b), clip.lo, clip.hi).

    rnn.w and clip.hi are main-graph initializers used only inside the body; loop.b is a body
    initializer and clip.lo a body Constant. Clip bounds must stay exact, the rest is lossy.
    """
    rng = np.random.default_rng(4)
    body = helper.make_graph(
        [
            helper.make_node("Constant", [], ["clip.lo"], value=numpy_helper.from_array(np.array(-0.9, np.float32))),
            helper.make_node("MatMul", ["h_in", "rnn.w"], ["m"]),
            helper.make_node("Add", ["m", "loop.b"], ["a"]),
            helper.make_node("Tanh", ["a"], ["t"]),
            helper.make_node("Clip", ["t", "clip.lo", "clip.hi"], ["h_out"]),
            helper.make_node("Identity", ["c_in"], ["c_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, 4]),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 4]),
        ],
        [numpy_helper.from_array((rng.standard_normal(4) * 0.1).astype(np.float32), "loop.b")],
    )
    inits = [
        numpy_helper.from_array(np.array(3, np.int64), "loop.trip"),
        numpy_helper.from_array(np.array(True), "loop.cond"),
        numpy_helper.from_array((rng.standard_normal((4, 4)) * 0.5).astype(np.float32), "rnn.w"),
        numpy_helper.from_array(np.array(0.8, np.float32), "clip.hi"),
    ]
    nodes = [helper.make_node("Loop", ["loop.trip", "loop.cond", "x"], ["y"], name="rnn", body=body)]
    graph = helper.make_graph(
        nodes,
        "loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        inits,
    )
    return _save(_model(graph), directory, "loop.onnx")


def build_scan(directory: Path) -> Path:
    """A Scan over x[3,4]: s = tanh(x_t @ cell.w + s @ cell.u + cell.b), ys_t = Reshape(s, cell.shape).

    cell.w is a main-graph initializer used inside the body, cell.u a body initializer, cell.b
    and the float shape cell.shape (cast to int64 for Reshape) body Constants. The initial state
    scan.s0 feeds the Scan node itself, which is no learned-parameter slot.
    """
    rng = np.random.default_rng(6)

    def f32(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    body = helper.make_graph(
        [
            helper.make_node("Constant", [], ["cell.b"], value=numpy_helper.from_array(f32(4) * 0.2)),
            helper.make_node(
                "Constant", [], ["cell.shape"], value=numpy_helper.from_array(np.array([1.0, 4.0], np.float32))
            ),
            helper.make_node("MatMul", ["x_t", "cell.w"], ["a"]),
            helper.make_node("MatMul", ["s_in", "cell.u"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["ab"]),
            helper.make_node("Add", ["ab", "cell.b"], ["pre"]),
            helper.make_node("Tanh", ["pre"], ["s_out"]),
            helper.make_node("Cast", ["cell.shape"], ["shape.i"], to=TensorProto.INT64),
            helper.make_node("Reshape", ["s_out", "shape.i"], ["y_t"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [4]),
            helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [4]),
        ],
        [
            helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [4]),
            helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [1, 4]),
        ],
        [numpy_helper.from_array(f32(4, 4), "cell.u")],
    )
    inits = [
        numpy_helper.from_array(f32(4, 4), "cell.w"),
        numpy_helper.from_array(f32(4) * 0.2, "scan.s0"),
    ]
    nodes = [
        helper.make_node("Scan", ["scan.s0", "x"], ["s_final", "ys"], name="cell", body=body, num_scan_inputs=1)
    ]
    graph = helper.make_graph(
        nodes,
        "scan",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [
            helper.make_tensor_value_info("s_final", TensorProto.FLOAT, [4]),
            helper.make_tensor_value_info("ys", TensorProto.FLOAT, [3, 1, 4]),
        ],
        inits,
    )
    return _save(_model(graph), directory, "scan.onnx")


def build_steering(directory: Path) -> Path:
    """Float constants that steer shapes or are otherwise exact, next to one real weight.

    x[1,2,4,4] -Reshape(Cast(shape.f * shape.gain))-> [1,32] -MatMul(proj.w)-> p[1,8]
    -Reshape(Concat(Slice(Shape(p)), [2,2,2]))-> [1,2,2,2] -Resize(resize.scales)-> [1,2,4,4]
    -Clip(clip.min, clip.max)- -Pad(pad.pads, pad.value)- -Quantize/DequantizeLinear(q.scale, q.zp)-> y.
    'unused.w' is consumed by nothing.
    """
    rng = np.random.default_rng(5)
    inits = [
        numpy_helper.from_array(np.array([1.0, 32.0], np.float32), "shape.f"),
        numpy_helper.from_array(np.array(1.0, np.float32), "shape.gain"),
        numpy_helper.from_array((rng.standard_normal((32, 8)) * 0.2).astype(np.float32), "proj.w"),
        numpy_helper.from_array(np.array([0], np.int64), "slice.start"),
        numpy_helper.from_array(np.array([1], np.int64), "slice.end"),
        numpy_helper.from_array(np.array([2, 2, 2], np.int64), "tail.shape"),
        numpy_helper.from_array(np.array([1.0, 1.0, 2.0, 2.0], np.float32), "resize.scales"),
        numpy_helper.from_array(np.array(-0.5, np.float32), "clip.min"),
        numpy_helper.from_array(np.array(0.5, np.float32), "clip.max"),
        numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pad.pads"),
        numpy_helper.from_array(np.array(0.25, np.float32), "pad.value"),
        numpy_helper.from_array(np.array(0.01, np.float32), "q.scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "q.zp"),
        numpy_helper.from_array((rng.standard_normal((3, 3))).astype(np.float32), "unused.w"),
    ]
    nodes = [
        helper.make_node("Mul", ["shape.f", "shape.gain"], ["shape.scaled"]),
        helper.make_node("Cast", ["shape.scaled"], ["shape.i"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["x", "shape.i"], ["r"]),
        helper.make_node("MatMul", ["r", "proj.w"], ["p"]),
        helper.make_node("Shape", ["p"], ["p.shape"]),
        helper.make_node("Slice", ["p.shape", "slice.start", "slice.end"], ["batch"]),
        helper.make_node("Concat", ["batch", "tail.shape"], ["q.shape"], axis=0),
        helper.make_node("Reshape", ["p", "q.shape"], ["q"]),
        helper.make_node("Resize", ["q", "", "resize.scales"], ["u"], mode="nearest"),
        helper.make_node("Clip", ["u", "clip.min", "clip.max"], ["c"]),
        helper.make_node("Pad", ["c", "pad.pads", "pad.value"], ["padded"], mode="constant"),
        helper.make_node("QuantizeLinear", ["padded", "q.scale", "q.zp"], ["quant"]),
        helper.make_node("DequantizeLinear", ["quant", "q.scale", "q.zp"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "steering",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 6])],
        inits,
    )
    return _save(_model(graph), directory, "steering.onnx")


CONV_BN_GEMM_ROLES: dict[str, TensorRole] = {
    "conv.weight": W,
    "conv.bias": N,
    "bn.scale": N,
    "bn.bias": N,
    "bn.mean": N,
    "bn.var": N,
    "fc.weight": W,
    "fc.bias": N,
    "flatten.shape": E,
}

# Builder name -> {tensor name -> role} for every tensor `onnx_format.read` should find.
EXPECTED_ROLES: dict[str, dict[str, TensorRole]] = {
    "build_conv_bn_gemm": CONV_BN_GEMM_ROLES,
    "build_conv_bn_gemm_constants": CONV_BN_GEMM_ROLES,
    "build_fp16": CONV_BN_GEMM_ROLES,
    "build_external_data": CONV_BN_GEMM_ROLES,
    "build_bf16": {"lin.weight": W, "lin.bias": N},
    "build_if_subgraph": {
        "w": W,
        "outer.w": W,
        "zero": E,  # decides the branch through Greater -> If
        "head.bias": N,
        "gate/then_branch/w": W,
        "gate/then_branch/then.bias": N,
        "gate/else_branch/else.w": W,
    },
    "build_loop": {
        "loop.trip": E,
        "loop.cond": E,
        "rnn.w": W,
        "clip.hi": E,
        "rnn/body/loop.b": N,
        "rnn/body/clip.lo": E,
    },
    "build_scan": {
        "cell.w": W,
        "scan.s0": E,  # consumed by the Scan node itself
        "cell/body/cell.u": W,
        "cell/body/cell.b": N,
        "cell/body/cell.shape": E,
    },
    "build_steering": {
        "shape.f": E,
        "shape.gain": E,  # consumed by a Mul, but its value reaches a Reshape shape
        "proj.w": W,  # only its shape reaches a Reshape (through Shape), never its values
        "slice.start": E,
        "slice.end": E,
        "tail.shape": E,
        "resize.scales": E,
        "clip.min": E,
        "clip.max": E,
        "pad.pads": E,
        "pad.value": E,
        "q.scale": E,
        "q.zp": E,
        "unused.w": E,
    },
}

# onnxruntime's CPU provider has no bfloat16 kernels for these ops.
NOT_RUNNABLE = frozenset({"build_bf16"})

BUILDERS = {
    fn.__name__: fn
    for fn in (
        build_conv_bn_gemm,
        build_conv_bn_gemm_constants,
        build_fp16,
        build_bf16,
        build_external_data,
        build_if_subgraph,
        build_loop,
        build_scan,
        build_steering,
    )
}


def sample_inputs(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random feeds for every graph input of the model at `path` (free dims -> 1)."""
    model = onnx.load_model(path, load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in tensor_type.shape.dim)
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if dtype.kind == "f" or dtype == np.dtype(ml_dtypes.bfloat16):
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.random(shape) < 0.5
        else:
            feeds[value.name] = rng.integers(0, 4, shape).astype(dtype)
    return feeds
