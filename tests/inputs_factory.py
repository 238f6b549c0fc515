"""Seeded ONNX models with inputs other than one float tensor (tests of nnc_tool/inputs.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
IR_VERSION = 9
VOCAB = 50  # rows of the transformer's token embedding table
BYTES = 257  # rows of the byte classifier's embedding table (256 bytes and padding)


def _save(graph: onnx.GraphProto, directory: Path, name: str) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="nnc-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    onnx.save_model(model, path)
    return path


def _init(rng: np.random.Generator, name: str, shape: tuple[int, ...], scale: float) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def build_transformer(directory: Path) -> Path:
    """input_ids, attention_mask, token_type_ids (int64 [batch, sequence]) -> embeddings (Gather)
    -> masked MatMul/Relu/MatMul -> mean over the sequence -> logits [batch, 4]."""
    rng = np.random.default_rng(3)
    inits = [
        _init(rng, "tok.weight", (VOCAB, 16), 1.0),
        _init(rng, "type.weight", (2, 16), 0.5),
        _init(rng, "ff1.weight", (16, 32), 0.3),
        _init(rng, "ff1.bias", (32,), 0.1),
        _init(rng, "ff2.weight", (32, 16), 0.3),
        _init(rng, "head.weight", (4, 16), 0.3),
        _init(rng, "head.bias", (4,), 0.1),
        numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
        numpy_helper.from_array(np.array([1], np.int64), "seq_axis"),
    ]
    nodes = [
        helper.make_node("Gather", ["tok.weight", "input_ids"], ["tok"], name="tok"),
        helper.make_node("Gather", ["type.weight", "token_type_ids"], ["typ"], name="typ"),
        helper.make_node("Add", ["tok", "typ"], ["emb"], name="emb"),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], name="maskf", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "last_axis"], ["mask3"], name="mask3"),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"], name="masked"),
        helper.make_node("MatMul", ["masked", "ff1.weight"], ["h1"], name="ff1"),
        helper.make_node("Add", ["h1", "ff1.bias"], ["h1b"], name="ff1b"),
        helper.make_node("Relu", ["h1b"], ["r1"], name="relu"),
        helper.make_node("MatMul", ["r1", "ff2.weight"], ["h2"], name="ff2"),
        helper.make_node("ReduceMean", ["h2", "seq_axis"], ["pooled"], name="pool", keepdims=0),
        helper.make_node("Gemm", ["pooled", "head.weight", "head.bias"], ["logits"], name="head", transB=1),
    ]
    ids = ["batch", "sequence"]
    graph = helper.make_graph(
        nodes, "transformer",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ids) for n in ("input_ids", "attention_mask", "token_type_ids")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        inits,
    )
    return _save(graph, directory, "transformer.onnx")


def build_byte_classifier(directory: Path) -> Path:
    """bytes (int32 [batch, 32], values 0..256) -> Gather embedding -> Flatten -> Gemm -> logits [batch, 5]."""
    rng = np.random.default_rng(4)
    inits = [_init(rng, "emb.weight", (BYTES, 8), 1.0), _init(rng, "fc.weight", (5, 256), 0.1), _init(rng, "fc.bias", (5,), 0.1)]
    nodes = [
        helper.make_node("Gather", ["emb.weight", "bytes"], ["e"], name="emb"),
        helper.make_node("Flatten", ["e"], ["f"], name="flat", axis=1),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "bytes",
        [helper.make_tensor_value_info("bytes", TensorProto.INT32, ["batch", 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])],
        inits,
    )
    return _save(graph, directory, "bytes.onnx")


def build_vad(directory: Path) -> Path:
    """silero-vad-like: input float [batch, 64], state float [2, batch, 8], sr int64 scalar; the
    speech probability is zero unless sr == 16000. Outputs: output [batch, 1], stateN [2, batch, 8]."""
    rng = np.random.default_rng(5)
    inits = [
        _init(rng, "enc.weight", (64, 8), 0.3),
        _init(rng, "dec.weight", (8, 1), 0.5),
        numpy_helper.from_array(np.array(16000, np.int64), "rate"),
        numpy_helper.from_array(np.array([0], np.int64), "first_axis"),
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "enc.weight"], ["h"], name="enc"),
        helper.make_node("Unsqueeze", ["h", "first_axis"], ["h3"], name="h3"),
        helper.make_node("Add", ["state", "h3"], ["s"], name="mix"),
        helper.make_node("Tanh", ["s"], ["stateN"], name="tanh"),
        helper.make_node("ReduceMean", ["stateN", "first_axis"], ["pooled"], name="pool", keepdims=0),
        helper.make_node("MatMul", ["pooled", "dec.weight"], ["z"], name="dec"),
        helper.make_node("Sigmoid", ["z"], ["p"], name="sig"),
        helper.make_node("Equal", ["sr", "rate"], ["is16k"], name="eq"),
        helper.make_node("Cast", ["is16k"], ["gate"], name="gate", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["p", "gate"], ["output"], name="gated"),
    ]
    graph = helper.make_graph(
        nodes, "vad",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 8]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", 8]),
        ],
        inits,
    )
    return _save(graph, directory, "vad.onnx")


def transformer_inputs(samples: int = 24, sequence: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((samples, sequence), np.int64)
    mask[:, sequence - 3 :] = rng.integers(0, 2, (samples, 3))
    return {
        "input_ids": rng.integers(0, VOCAB, (samples, sequence)).astype(np.int64),
        "attention_mask": mask,
        "token_type_ids": rng.integers(0, 2, (samples, sequence)).astype(np.int64),
    }
