"""Tensor names in data units: UTF-8, or shorter through a fixed dictionary of name tokens.

Every data unit names its tensor, and model tensor names are long and repetitive
("block3.expand_bn.running_mean", "encoder.layer.7.attention.self.query.weight"). A data unit must
decode on its own, so names cannot refer to each other; instead the format fixes a dictionary of
128 tokens common in PyTorch, ONNX, TensorFlow/Keras and Hugging Face names. A tokenised name is a
byte string where bytes 0x00-0x7F are ASCII characters and byte 0x80 + i stands for TOKENS[i].
The encoder finds the shortest such spelling (dynamic programming) and uses it when it is
shorter than the UTF-8 name.

The table is part of the bitstream format (docs/FORMAT.md): never reorder or change an entry.
"""
from __future__ import annotations

from functools import lru_cache

from ..bitstream.primitives import ByteReader, ByteWriter
from ..errors import BitstreamError

MAX_NAME_BYTES = 1 << 16

TOKENS: tuple[str, ...] = (
    # 0x80: parameter suffixes (PyTorch state dicts, ONNX initializers exported from them)
    ".weight", ".bias", ".running_mean", ".running_var", ".num_batches_tracked", "weight", "bias", "running_",
    # 0x88
    "_weight", "_bias", "in_proj_weight", "in_proj_bias", ".gamma", ".beta", ".scale", "kernel",
    # 0x90: convolution / normalisation
    "conv", "Conv", "bn", "norm", "Norm", "LayerNorm", "layernorm", "layer_norm",
    # 0x98
    "batch_norm", "BatchNorm", "batchnorm", "BatchNormalization", "group_norm", "downsample", "shortcut", "residual",
    # 0xA0: containers
    "layer", "layers", "block", "blocks", "stage", "stages", "features", "classifier",
    # 0xA8
    "head", "stem", "backbone", "encoder", "decoder", "module", "model", "branch",
    # 0xB0: linear layers
    "fc", "linear", "Linear", "dense", "Dense", "proj", "project", "projection",
    # 0xB8
    "expand", "squeeze", "excitation", "reduce", "depthwise", "pointwise", "dw", "pw",
    # 0xC0: attention / transformers
    "attention", "attn", "self_attn", "self", "query", "key", "value", "qkv",
    # 0xC8
    "q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj",
    # 0xD0
    "mlp", "ffn", "feed_forward", "intermediate", "output", "transformer", "embeddings", "embedding",
    # 0xD8
    "embed", "position", "token", "word_embeddings", "position_embeddings", "LayerNorm.", "input_layernorm", "post_attention_layernorm",
    # 0xE0
    "patch_embed", "pos_embed", "cls_token", "lm_head", "c_attn", "c_proj", "c_fc", "rotary_emb",
    # 0xE8: ONNX exporter and torch.export names
    "onnx::", "Conv_", "Gemm_", "MatMul_", "Add_", "Mul_", "Constant", "_output_0",
    # 0xF0
    "initializer", "_param_constant", "_tensor_constant", "p_", "b_", "val_", "MatMul", "Gemm",
    # 0xF8: TensorFlow / Keras
    "conv2d", "Conv2D", "batch_normalization", "moving_mean", "moving_variance", "depthwise_kernel", "/kernel", ":0",
)
assert len(TOKENS) == 128 and len(set(TOKENS)) == 128
assert all(t.isascii() and len(t) >= 2 for t in TOKENS)

_BY_FIRST: dict[str, list[tuple[int, str]]] = {}
for _index, _token in enumerate(TOKENS):
    _BY_FIRST.setdefault(_token[0], []).append((_index, _token))


@lru_cache(maxsize=4096)
def tokenize(name: str) -> bytes | None:
    """The shortest tokenised spelling of an ASCII name (None if the name is not ASCII).

    Ties go to the spelling whose first differing choice comes earlier in (literal, tokens in
    table order), so the output is deterministic.
    """
    if not name.isascii():
        return None
    n = len(name)
    # best[i] = (length, choice) of the shortest spelling of name[i:]
    best: list[tuple[int, int]] = [(0, -1)] * (n + 1)
    for i in range(n - 1, -1, -1):
        length, choice = best[i + 1][0] + 1, -1
        for index, token in _BY_FIRST.get(name[i], ()):
            if name.startswith(token, i) and best[i + len(token)][0] + 1 < length:
                length, choice = best[i + len(token)][0] + 1, index
        best[i] = (length, choice)
    out = bytearray()
    i = 0
    while i < n:
        choice = best[i][1]
        if choice < 0:
            out.append(ord(name[i]))
            i += 1
        else:
            out.append(0x80 + choice)
            i += len(TOKENS[choice])
    return bytes(out)


def write_name(writer: ByteWriter, name: str) -> None:
    """varint (byte count * 2 + mode), then the bytes: mode 0 UTF-8, mode 1 tokenised."""
    raw = name.encode("utf-8")
    if len(raw) > MAX_NAME_BYTES:
        raise ValueError(f"tensor name of {len(raw)} bytes is longer than {MAX_NAME_BYTES}")
    tokens = tokenize(name)
    if tokens is not None and len(tokens) < len(raw):
        writer.varint(len(tokens) * 2 + 1)
        writer.raw(tokens)
    else:
        writer.varint(len(raw) * 2)
        writer.raw(raw)


def read_name(reader: ByteReader) -> str:
    field = reader.varint(2 * MAX_NAME_BYTES + 1)
    body = bytes(reader.raw(field >> 1))
    if field & 1:
        text = "".join(chr(b) if b < 0x80 else TOKENS[b - 0x80] for b in body)
        if len(text) > MAX_NAME_BYTES:
            raise BitstreamError(None, "data unit has an overlong tensor name")
        return text
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise BitstreamError(None, "data unit has a malformed tensor name") from None
