"""Model inputs: the one place that knows what a model takes and how samples feed it.

Calibration (`--calib`), evaluation data (`--data`) and synthesised probes all arrive as
`ModelInputs`: named sample arrays, one per model input.

Layout (in an .npz file and in memory): one array per model input, named after it. Each array's
first axis indexes samples. Sample i feeds `arr[i]` when the array has one axis more than the
input declares ("stacked"), else `arr[i:i+1]` (a row along the model's own batch axis). So
digits `x` of shape (500, 1, 8, 8) for an input [batch, 1, 8, 8] holds 500 rows, and silero's
`sr` of shape (500,) for a scalar input holds 500 stacked scalars. When every array is in rows
and every input's first dimension is dynamic, samples run in batches; otherwise one at a time.

Outputs of a run (`run_session`, `run_model`) come back per graph output with samples along
axis 0: concatenated along the model's batch axis when every input array is in rows, stacked
on a new axis 0 when any is stacked (one sample per run then).

`load_inputs` reads and checks an .npz file against a model; `as_model_inputs` accepts what
the Python API takes (None, a bare array for a one-input model, a dict, ModelInputs);
`probe_inputs` synthesises inputs from the graph (see its docstring for the rules).
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import NncError, UsageError
from .model import Model, numpy_dtype

__all__ = [
    "InputSpec", "ModelInputs", "ReplaceableSession", "as_model_inputs", "calibration_inputs", "input_signature",
    "load_inputs", "probe_inputs", "read_inputs", "run_model", "run_session",
]

# The .npz array that holds labels (for --data), never a model input.
LABELS = "y"
# The legacy name of the one array of a one-input model's data file.
LEGACY_INPUT = "x"
# Samples per onnxruntime run in `run_model` when samples can be batched.
RUN_BATCH = 256


@dataclass(frozen=True)
class InputSpec:
    """One data input of a model: its name, numpy dtype and shape (None: dynamic or unknown
    dimension; `shape` None: unknown rank). `dim_names` are the symbolic names of the dynamic
    dimensions where the graph gives them (ONNX dim_param), else None."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None
    dim_names: tuple[str | None, ...] | None = None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    def describe(self) -> str:
        """The shape as users read it: [batch, 1, 28, 28]."""
        if self.shape is None:
            return "[?]"
        names = self.dim_names or (None,) * len(self.shape)
        return "[" + ", ".join(str(d) if d is not None else (n or "?") for d, n in zip(self.shape, names)) + "]"


def input_signature(model: Model) -> list[InputSpec]:
    """The data inputs (graph inputs that are not initializers) of an ONNX model, in graph order."""
    if model.format != "onnx":
        raise UsageError(None, f"a {model.format} model declares no input signature (ONNX models do)")
    import onnx

    from .graph.onnx_util import topology_proto

    graph = topology_proto(model.topology).graph
    weights = {t.name for t in model.tensors} | {init.name for init in graph.initializer}
    specs = []
    for value in graph.input:
        if value.name in weights:
            continue
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type == onnx.TensorProto.BFLOAT16:
            dtype = numpy_dtype("bfloat16")  # onnx maps it to a 2-byte void type
        else:
            try:
                dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
            except (KeyError, TypeError, ValueError):
                dtype = np.dtype(np.float32)
        shape = names = None
        if tensor_type.HasField("shape"):
            dims = tensor_type.shape.dim
            shape = tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims)
            names = tuple(d.dim_param or None for d in dims)
        specs.append(InputSpec(value.name, dtype, shape, names))
    return specs


@dataclass(eq=False)  # arrays have no single truth value: compare the arrays themselves
class ModelInputs:
    """Named samples for a model (see the module docstring for the layout).

    `arrays` maps input names to sample arrays (in the model's input order once bound);
    `signature` is the model's input signature they were checked against (None: not bound to a
    model, e.g. read before the model is known or for a PyTorch model); `labels` are the
    optional integer labels ('y'); `source` names the file they came from, for error messages.
    `_stacked` (by name: samples on an extra first axis) is derived from the signature unless given.
    """

    arrays: dict[str, np.ndarray]
    signature: list[InputSpec] | None = None
    labels: np.ndarray | None = None
    source: str | None = None
    _stacked: dict[str, bool] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self._stacked:
            specs = {s.name: s for s in self.signature or []}
            self._stacked = {
                name: specs.get(name) is not None and specs[name].rank is not None and arr.ndim == specs[name].rank + 1
                for name, arr in self.arrays.items()
            }

    def __len__(self) -> int:
        return int(len(next(iter(self.arrays.values())))) if self.arrays else 0

    @property
    def names(self) -> list[str]:
        return list(self.arrays)

    def stacked(self, name: str) -> bool:
        """Whether sample i of this array is `arr[i]` (True) or the row `arr[i:i+1]` (False)."""
        return self._stacked.get(name, False)

    @property
    def in_rows(self) -> bool:
        """Every array holds its samples as rows along the model's batch axis."""
        return not any(self._stacked.values())

    @property
    def batchable(self) -> bool:
        """Several samples can go into one run: rows everywhere and every first dimension dynamic."""
        if not self.in_rows:
            return False
        specs = {s.name: s for s in self.signature or []}
        return all(specs[n].shape is None or (specs[n].shape and specs[n].shape[0] is None) for n in self.arrays if n in specs)

    @property
    def single(self) -> np.ndarray | None:
        """The one array of one-input data (what single-input code paths still take), else None."""
        return next(iter(self.arrays.values())) if len(self.arrays) == 1 else None

    def select(self, index: slice | np.ndarray) -> ModelInputs:
        """The samples `index` picks (a slice or an index array along the sample axis)."""
        labels = None if self.labels is None else self.labels[index]
        return replace(self, arrays={n: a[index] for n, a in self.arrays.items()}, labels=labels, _stacked=dict(self._stacked))

    def head(self, count: int) -> ModelInputs:
        """The first `count` samples."""
        return self.select(slice(0, count))

    def repeat(self, times: int) -> ModelInputs:
        """The samples `times` over (copy after copy), e.g. one copy per evaluated mask."""
        labels = None if self.labels is None else np.concatenate([self.labels] * times)
        arrays = {n: np.concatenate([a] * times) for n, a in self.arrays.items()}
        return replace(self, arrays=arrays, labels=labels, _stacked=dict(self._stacked))

    def feeds(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Session feeds for samples start..stop (more than one only when `batchable`)."""
        if stop - start != 1 and not self.batchable:
            raise ValueError("these inputs run one sample at a time")
        specs = {s.name: s for s in self.signature or []}
        out = {}
        for name, arr in self.arrays.items():
            part = arr[start] if self.stacked(name) else arr[start:stop]
            dtype = specs[name].dtype if name in specs else part.dtype
            out[name] = np.ascontiguousarray(part, dtype=dtype)
        return out

    def ranges(self, batch_size: int | None = None) -> Iterator[tuple[int, int]]:
        """(start, stop) of each run: batches of `batch_size` (None: all at once) if batchable, else single samples."""
        total = len(self)
        step = (batch_size or max(total, 1)) if self.batchable else 1
        for start in range(0, total, step):
            yield start, min(start + step, total)

    def combine(self, parts: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
        """Per-run outputs (a list per run) joined per output: concatenated along axis 0 when the
        inputs are in rows, stacked on a new axis 0 otherwise (see the module docstring)."""
        if not parts:
            return []
        joined = []
        for outputs in zip(*parts):
            arrays = [np.asarray(o) for o in outputs]
            if len(arrays) == 1 and self.in_rows and arrays[0].ndim:
                joined.append(arrays[0])
            elif self.in_rows and all(a.ndim for a in arrays):
                joined.append(np.concatenate(arrays))
            else:
                joined.append(np.stack(arrays))
        return joined


def run_session(session, inputs: ModelInputs, output_names: Sequence[str] | None = None,
                batch_size: int | None = None, extra_feeds: Mapping[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """Run an onnxruntime session on every sample of `inputs`: in batches of `batch_size` (None:
    all samples in one run) where they can be batched, else one sample per run; outputs joined as
    `ModelInputs.combine` says. `extra_feeds` (e.g. overridden initializers) go to every run."""
    names = None if output_names is None else list(output_names)
    parts = []
    for start, stop in inputs.ranges(batch_size):
        feeds = inputs.feeds(start, stop)
        if extra_feeds:
            feeds.update(extra_feeds)
        parts.append(session.run(names, feeds))
    return inputs.combine(parts)


def run_model(model: Model, inputs: ModelInputs | np.ndarray, batch_size: int = RUN_BATCH) -> list[np.ndarray]:
    """Every graph output of an ONNX `Model` on `inputs` (onnxruntime, one thread): per output,
    the samples along axis 0 - concatenated along the batch axis when the inputs are in rows,
    stacked on a new axis 0 otherwise (see the module docstring)."""
    from .formats.onnx_format import runtime_proto
    from .graph.onnx_util import cpu_session

    inputs = as_model_inputs(inputs, model)
    proto, weights = runtime_proto(model)
    session = cpu_session(proto, threads=1, initializers=weights)
    return run_session(session, inputs, batch_size=batch_size)


class ReplaceableSession:
    """One onnxruntime session of an ONNX `Model` whose float tensors can be replaced run by run
    (formats.onnx_format.overridable_proto: they are graph inputs too), so running the model
    with other values for a few tensors costs a run, not a session build.

    `names` are the tensors that can be replaced (a body tensor whose name another value shares
    stays baked in); `session` and `proto` serve callers that need the model's own session too.
    """

    def __init__(self, model: Model, threads: int = 1, optimization_level=None) -> None:
        from .formats.onnx_format import overridable_proto
        from .graph.onnx_util import cpu_session

        self.proto, self._input_of, weights = overridable_proto(model)
        self.names = frozenset(self._input_of)
        declared = {v.name: v.type.tensor_type.shape.dim for v in self.proto.graph.input}
        self._shapes = {name: tuple(int(d.dim_value) for d in declared[value]) for name, value in self._input_of.items()}
        self.session = cpu_session(self.proto, threads=threads, optimization_level=optimization_level, initializers=weights)

    def run(self, inputs: ModelInputs, replaced: Mapping[str, np.ndarray] | None = None,
            batch_size: int | None = None) -> list[np.ndarray]:
        """Every output on `inputs` (as `run_session` joins them) with the `replaced` tensors
        (name -> values, each one of `names`) in place of the model's."""
        feeds = {
            self._input_of[name]: np.ascontiguousarray(values).reshape(self._shapes[name])
            for name, values in (replaced or {}).items()
        }
        return run_session(self.session, inputs, batch_size=batch_size, extra_feeds=feeds)


def calibration_inputs(data, model: Model) -> ModelInputs | None:
    """Calibration data as the Python API takes it (see `as_model_inputs`) bound to `model`;
    None for none, an empty array or no samples."""
    if data is None or (isinstance(data, np.ndarray) and data.size == 0):
        return None
    bound = as_model_inputs(data, model)
    return bound if len(bound) else None


# --------------------------------------------------------------------------------------------
# Reading and checking
# --------------------------------------------------------------------------------------------


def read_inputs(path: str | os.PathLike) -> ModelInputs:
    """The arrays of an .npz file as unbound ModelInputs ('y' as labels), never unpickling."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise UsageError(path, "data file is not an .npz archive of named arrays")
            arrays = {name: archive[name] for name in archive.files}
    except NncError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise UsageError(path, f"cannot read data file ({_one_line(exc)})") from None
    labels = arrays.pop(LABELS, None)
    if not arrays:
        raise UsageError(path, "data file holds no input arrays" + (" (only labels 'y')" if labels is not None else ""))
    inputs = ModelInputs(arrays, None, labels, os.fspath(path))
    _check_counts(inputs)
    return inputs


def load_inputs(path: str | os.PathLike, model: Model) -> ModelInputs:
    """An .npz file's arrays, checked against `model`'s inputs and in their dtypes (see `bind_inputs`)."""
    return bind_inputs(read_inputs(path), model)


def as_model_inputs(data, model: Model) -> ModelInputs | None:
    """What the Python API accepts as inputs, bound to `model`: None; ModelInputs (bound here if
    it was not, or to another signature); a mapping of arrays by input name; a bare array for a
    one-input model (wrapped, as calibration arrays used to be passed)."""
    if data is None:
        return None
    if isinstance(data, ModelInputs):
        if data.signature is not None and model.format == "onnx" and data.signature == input_signature(model):
            return data
        return bind_inputs(data, model)
    if isinstance(data, Mapping):
        arrays = {str(k): np.asarray(v) for k, v in data.items()}
        labels = arrays.pop(LABELS, None)
        return bind_inputs(ModelInputs(arrays, None, labels), model)
    return bind_inputs(ModelInputs({LEGACY_INPUT: np.asarray(data)}), model)


def bind_inputs(inputs: ModelInputs, model: Model) -> ModelInputs:
    """`inputs` checked against the model's inputs and converted to their dtypes.

    Arrays are named after the model's inputs; a single array 'x' stands for the one input of
    a one-input model. A missing or unknown array, float data for an integer input, integer data
    that does not fit the input's type, or a shape the input cannot take is a UsageError naming
    the file and the array. Non-ONNX models (no signature) take their arrays as they are.
    """
    path = inputs.source
    _check_counts(inputs)
    if model.format != "onnx":
        return replace(inputs, signature=None, _stacked={})
    signature = input_signature(model)
    expected = [s.name for s in signature]
    arrays = dict(inputs.arrays)
    if len(signature) == 1 and expected[0] not in arrays and list(arrays) == [LEGACY_INPUT]:
        arrays = {expected[0]: arrays[LEGACY_INPUT]}
    listing = f"(model inputs: {', '.join(expected) or 'none'})"
    for name in arrays:
        if name not in expected:
            raise UsageError(path, f"array '{name}' is not a model input {listing}")
    bound = {}
    for spec in signature:
        if spec.name not in arrays:
            raise UsageError(path, f"array '{spec.name}' is missing {listing}")
        bound[spec.name] = _convert(arrays[spec.name], spec, path)
    return ModelInputs(bound, signature, inputs.labels, path)


def _check_counts(inputs: ModelInputs) -> None:
    first = None
    for name, arr in inputs.arrays.items():
        if arr.ndim == 0:
            raise UsageError(inputs.source, f"array '{name}' is a scalar: its first axis must index samples")
        if first is None:
            first = (name, len(arr))
        elif len(arr) != first[1]:
            raise UsageError(inputs.source, f"array '{name}' has {len(arr)} samples but '{first[0]}' has {first[1]}")
    if inputs.labels is not None and first is not None and len(inputs.labels) != first[1]:
        raise UsageError(inputs.source, f"'{first[0]}' has {first[1]} samples but 'y' has {len(inputs.labels)}")


def _convert(arr: np.ndarray, spec: InputSpec, path: str | None) -> np.ndarray:
    want = spec.dtype
    if arr.dtype.kind in "fc" and want.kind in "iub":
        raise UsageError(path, f"array '{spec.name}' holds {arr.dtype} values but input '{spec.name}' takes {want}")
    if arr.dtype.kind not in "fiub":
        raise UsageError(path, f"array '{spec.name}' holds {arr.dtype} values, not numbers")
    if want.kind in "iu" and arr.dtype != want and arr.size:
        info = np.iinfo(want)
        low, high = (int(arr.min()), int(arr.max())) if arr.dtype != np.bool_ else (0, 1)
        if low < info.min or high > info.max:
            raise UsageError(path, f"array '{spec.name}' has values {low}..{high} that do not fit input '{spec.name}' ({want})")
    if want.kind == "b" and arr.dtype != np.bool_ and arr.size and not np.isin(arr, (0, 1)).all():
        raise UsageError(path, f"array '{spec.name}' has values other than 0 and 1 for the bool input '{spec.name}'")
    if spec.shape is not None:
        rank = len(spec.shape)
        if arr.ndim not in (rank, rank + 1):
            layouts = f"rank {rank} (one row per sample) or {rank + 1} (samples on a new first axis)" if rank else "rank 1 (one value per sample)"
            raise UsageError(path, f"array '{spec.name}' has shape {tuple(arr.shape)} but input '{spec.name}' takes"
                             f" {spec.describe()}: give {layouts}")
        stacked = arr.ndim == rank + 1
        if not stacked and spec.shape[0] not in (None, 1):
            raise UsageError(path, f"array '{spec.name}' has shape {tuple(arr.shape)} but input '{spec.name}' takes {spec.describe()}:"
                             f" a sample is a whole batch of {spec.shape[0]}, so give samples on a new first axis")
        dims = arr.shape[1:]
        declared = spec.shape if stacked else spec.shape[1:]
        offset = 0 if stacked else 1
        for axis, (have, need) in enumerate(zip(dims, declared)):
            if need is not None and have != need:
                raise UsageError(path, f"array '{spec.name}' has shape {tuple(arr.shape)} but input '{spec.name}' takes"
                                 f" {spec.describe()} (axis {axis + offset} of a sample must be {need})")
    return arr if arr.dtype == want else arr.astype(want)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------

_BATCH_NAMES = re.compile(r"^(n|b|batch.*|.*_batch|bs|num_batch.*|unk__\d+)$", re.IGNORECASE)
_SEQUENCE_NAMES = re.compile(r"seq|len|token|time|step|frame|word|text|sentence|position|past|total", re.IGNORECASE)
_SPATIAL_NAMES = re.compile(r"height|width|^h$|^w$|size|spatial|pixel", re.IGNORECASE)
_STATE_NAMES = re.compile(r"state|hidden|cache|memory|^h0$|^c0$|^h$|^c$|^past", re.IGNORECASE)
_MASK_NAMES = re.compile(r"mask", re.IGNORECASE)
_ZERO_NAMES = re.compile(r"token_type|segment", re.IGNORECASE)
_POSITION_NAMES = re.compile(r"position", re.IGNORECASE)
# Integer inputs that give the length of the sequences beside them (waveforms_lens, length, seq_len).
_LENGTH_NAMES = re.compile(r"(^|_)(len|lens|length|lengths)$", re.IGNORECASE)
# Candidate values of dynamic dimensions, tried in this order (index k of every list together)
# until the model runs on one sample.
_SPATIAL_CANDIDATES = (224, 64, 32, 28, 16, 8)
# Audio frames need hundreds of samples; the degenerate 4 and 1 come last (an ASR front end runs
# on 1 sample but not on 2 of them, nor on 16 - it needs a 400-sample frame).
_SEQUENCE_CANDIDATES = (16, 8, 32, 64, 128, 256, 512, 1024, 4, 1)
_CHANNELS = 3
# At most this many sizes named by Reshape constants are tried after the candidates above.
_IMPLIED_TRIALS = 8
# Integer inputs the graph says nothing about take values in [0, _INTEGER_RANGE).
_INTEGER_RANGE = 16
# Ops through which an integer input keeps its values (as far as the bound of an index goes).
_PASSTHROUGH = frozenset({"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Expand", "Transpose", "Slice", "Tile"})
_FOLLOW_DEPTH = 6
_RECURRENT = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}


def probe_inputs(model: Model, samples: int = 8, seed: int = 0, session=None, proto=None) -> ModelInputs:
    """Inputs synthesised from an ONNX model's input signature, `samples` of them (deterministic for a seed).

    Shapes. Fixed dimensions are kept. A dynamic first dimension (or one named like a batch:
    batch, N, B, ...) is the batch axis and holds 1 per sample; those inputs are laid out in
    rows (samples along that axis, so they run in batches), every other input is stacked
    (samples on a new first axis). Dynamic dimensions sharing a name share a value. A dynamic
    channel axis (axis 1 of a rank >= 3 float input) is 3. Other dynamic dimensions are spatial
    (axes >= 2 of rank >= 3 float inputs, or named height/width/size) or sequence-like (the
    rest: token, time and sequence axes); they take candidate values - spatial 224, 64, 32, 28,
    16, 8; sequence 16, 8, 32, 64, 128, 256, 512, 1024 (audio chunks), 4, 1; then the sizes
    Reshape shapes name as constants (a traced length baked into an export) - tried together in
    that order until the model runs on one sample in onnxruntime with the declared output sizes
    and batch 1 (so a Reshape or a stride pattern that constrains them is met), and its outputs
    change with the inputs (two different random fills). An input has one batch axis: in
    [batch_size, N] the N is a sequence, not a second batch.

    Values. Float inputs are standard normal, except state inputs of recurrent models (names
    like state, hidden, cache, h0/c0, or feeding an LSTM/GRU/RNN's initial state) which are
    zeros. Integer (and bool) inputs take what the graph implies, following the input forward
    through value-keeping ops (Cast, Unsqueeze, Squeeze, Reshape, Expand, Slice, ... and Add/Sub
    of a constant, whose offset is accounted for), a few nodes deep:
    names with 'mask' -> ones (even where the graph compares them with 0); token_type_ids /
    segment ids -> zeros; compared by Equal with a constant -> that constant (silero's
    sr == 16000); position ids -> 0, 1, 2, ... along the last axis; indices of a Gather from a
    constant table -> uniform below the table's size on the gathered axis (less any added
    offset); integers named like lengths (waveforms_lens, length) -> the longest dynamic axis of
    the float inputs; otherwise uniform in [0, 16), clipped to the type.
    
    `session`: an onnxruntime session of the model to try the dimensions on, and `proto`: the
    model's ModelProto with every tensor's dims and the values of the small ones (the self-check
    passes its own of both), else they are built.
    """
    if model.format != "onnx":
        raise UsageError(None, f"probe inputs need an ONNX model's input signature; this is a {model.format} model")
    from .formats.onnx_format import to_proto

    signature = input_signature(model)
    if proto is None:
        proto = to_proto(model, max_elements=64)  # dims of every tensor, values of the small ones
    facts = _GraphFacts(proto.graph)
    plans = [_dimension_plan(spec, signature) for spec in signature]
    assignment = _choose_dimensions(model, signature, plans, facts.reshape_sizes(), facts, session)
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    stacked: dict[str, bool] = {}
    for spec, plan in zip(signature, plans):
        sample_shape = tuple(assignment.get(key, value) if key is not None else value for key, value in plan)
        in_rows = bool(spec.shape) and (spec.shape[0] is None or spec.shape[0] == 1) and sample_shape[0] == 1
        shape = (samples, *sample_shape[1:]) if in_rows else (samples, *sample_shape)
        arrays[spec.name] = _probe_values(spec, shape, facts, rng)
        stacked[spec.name] = not in_rows
    _fill_lengths(signature, arrays)
    return ModelInputs(arrays, signature, None, None, stacked)


def _fill_lengths(signature: list[InputSpec], arrays: dict[str, np.ndarray]) -> None:
    """Integer inputs named like lengths hold the full length of the sequences they describe: the
    longest dynamic axis (past the first) of the float inputs - a waveform's samples, a feature
    sequence's frames. A random length would index past the data (an ASR front end's Scatter)."""
    lengths = [
        arrays[spec.name].shape[axis]
        for spec in signature
        if spec.dtype.kind == "f" and spec.shape is not None and spec.name in arrays
        for axis, size in enumerate(spec.shape)
        if axis > 0 and size is None and axis < arrays[spec.name].ndim
    ]
    if not lengths:
        return
    for spec in signature:
        if spec.dtype.kind in "iu" and spec.name in arrays and _LENGTH_NAMES.search(spec.name):
            arrays[spec.name] = np.full(arrays[spec.name].shape, max(lengths), dtype=spec.dtype)


def _dimension_plan(spec: InputSpec, signature: list[InputSpec]) -> list[tuple[tuple[str, str] | None, int]]:
    """Per axis: (None, fixed size) or ((category, key), default) for a dimension to choose."""
    if spec.shape is None:
        return []
    batch_names = {s.dim_names[0] for s in signature if s.dim_names and s.shape and s.shape[0] is None and s.dim_names[0]}
    plan = []
    rank = len(spec.shape)
    batched = False  # one batch axis per input: [batch_size, N] is a batch of N samples
    for axis, size in enumerate(spec.shape):
        if size is not None:
            plan.append((None, size))
            continue
        name = spec.dim_names[axis] if spec.dim_names else None
        if _STATE_NAMES.search(spec.name):
            plan.append((None, 1))  # a recurrent state's free axis is its batch (silero: [2, batch, 128])
        elif (not batched and name and (name in batch_names or _BATCH_NAMES.match(name))
              and not _SEQUENCE_NAMES.search(name)):
            plan.append((None, 1))
            batched = True
        elif axis == 0 and not (name and (_SEQUENCE_NAMES.search(name) or _SPATIAL_NAMES.search(name))):
            plan.append((None, 1))
            batched = True
        elif axis == 1 and rank >= 3 and spec.dtype.kind == "f" and not (name and _SPATIAL_NAMES.search(name)):
            plan.append((None, _CHANNELS))
        else:
            spatial = (spec.dtype.kind == "f" and rank >= 3 and axis >= 2) or bool(name and _SPATIAL_NAMES.search(name))
            category = "spatial" if spatial else "sequence"
            key = name or f"{spec.name}:{axis}"
            plan.append(((category, key), 0))
    return plan


def _choose_dimensions(model: Model, signature: list[InputSpec], plans, implied: Sequence[int] = (), facts=None,
                       session=None) -> dict:
    """Values for the dimensions to choose: the first candidate row on which the model runs
    (the standard candidates, then each size a Reshape of the graph names, for graphs exported
    with a traced length baked in)."""
    keys = sorted({key for plan in plans for key, _ in plan if key is not None})
    if not keys:
        return {}
    batch_names = {
        name for spec, plan in zip(signature, plans) for (key, size), name in zip(plan, spec.dim_names or ())
        if key is None and size == 1 and name
    }
    def candidate(key, k: int) -> int:
        sizes = _SPATIAL_CANDIDATES if key[0] == "spatial" else _SEQUENCE_CANDIDATES
        return sizes[min(k, len(sizes) - 1)]

    rows = [{key: candidate(key, k) for key in keys} for k in range(max(len(_SPATIAL_CANDIDATES), len(_SEQUENCE_CANDIDATES)))]
    rows += [{key: size for key in keys} for size in implied if size not in _SEQUENCE_CANDIDATES][:_IMPLIED_TRIALS]
    try:
        import onnxruntime as ort

        from .formats.onnx_format import runtime_proto
        from .graph.onnx_util import cpu_session

        if session is None:
            proto, weights = runtime_proto(model)
            session = cpu_session(proto, threads=1, initializers=weights)
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # a size that does not fit is expected here, not an error to print
    except Exception:  # a model onnxruntime cannot load: the caller's run will say why
        return rows[0]
    def trial_feeds(row: dict, fill, seed: int = 0) -> dict[str, np.ndarray]:
        """Feeds for `row`: floats 0.1 (`fill(shape, dtype)` if given, states excepted); integers
        as the probes draw them, from `seed` (token ids differ between seeds, an sr does not)."""
        feeds = {}
        for spec, plan in zip(signature, plans):
            shape = tuple(row.get(key, value) if key is not None else value for key, value in plan)
            if facts is not None and spec.dtype.kind in "iub":
                # Integer inputs take the values the probes will (an sr the graph compares with 16000).
                rng = np.random.default_rng(seed)
                feeds[spec.name] = _probe_values(spec, (1, *shape) if not shape else shape, facts, rng).reshape(shape)
            elif spec.dtype.kind != "f":
                feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
            elif fill is not None and not (_STATE_NAMES.search(spec.name) or (facts is not None and facts.recurrent_state(spec.name))):
                feeds[spec.name] = fill(shape, spec.dtype)
            else:
                feeds[spec.name] = np.full(shape, 0.1, spec.dtype)
        _fill_lengths(signature, feeds)
        return feeds

    noise_source = np.random.default_rng(1)
    noise = lambda shape, dtype: noise_source.standard_normal(shape).astype(dtype)  # noqa: E731
    first_fit = None
    for row in rows:
        try:
            outputs = session.run(None, trial_feeds(row, None), quiet)
        except Exception:  # this size does not fit the graph: try the next
            continue
        if not all(_fits(np.asarray(o), meta.shape, batch_names) for o, meta in zip(outputs, session.get_outputs())):
            continue
        if first_fit is None:
            first_fit = row
        # A size on which the outputs do not depend on the inputs runs but says nothing: silero
        # takes a 256-sample chunk and answers the same for any noise (its STFT needs 512).
        try:
            outputs, other = (session.run(None, trial_feeds(row, noise, seed), quiet) for seed in (1, 2))
        except Exception:
            continue
        if any(np.asarray(a).shape != np.asarray(b).shape or not np.array_equal(a, b) for a, b in zip(outputs, other)):
            return row
    return first_fit if first_fit is not None else rows[0]


def _fits(output: np.ndarray, declared, batch_names: set[str]) -> bool:
    """An output of a one-sample trial run has the declared fixed sizes and batch 1 on batch axes
    (a Reshape to [-1, k] may accept a wrong size by moving it into the batch axis)."""
    if not declared or len(declared) != output.ndim:
        return True
    for size, want in zip(output.shape, declared):
        if isinstance(want, int) and want > 0 and size != want:
            return False
        if isinstance(want, str) and want in batch_names and size != 1:
            return False
    return True


class _GraphFacts:
    """What the main graph says about the values of its inputs: consumers and constants."""

    def __init__(self, graph) -> None:
        from onnx import numpy_helper

        self.nodes = list(graph.node)
        self.producers = {out: node for node in graph.node for out in node.output if out}
        self.consumers: dict[str, list[tuple[object, int]]] = {}
        for node in graph.node:
            for index, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, index))
        self.dims: dict[str, tuple[int, ...]] = {}
        self.values: dict[str, np.ndarray] = {}
        for init in graph.initializer:
            self.dims[init.name] = tuple(init.dims)
            if init.HasField("raw_data") or len(init.int64_data) or len(init.int32_data) or len(init.float_data):
                try:
                    self.values[init.name] = numpy_helper.to_array(init)
                except Exception:  # a payload we cannot read: only its dims count
                    pass
        for node in graph.node:
            if node.op_type != "Constant" or not node.output:
                continue
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    self.dims[node.output[0]] = tuple(attr.t.dims)
                    try:
                        self.values[node.output[0]] = numpy_helper.to_array(attr.t)
                    except Exception:  # stripped payload
                        pass
                elif attr.name in ("value_int", "value_ints"):
                    value = np.asarray(attr.i if attr.name == "value_int" else list(attr.ints), dtype=np.int64)
                    self.values[node.output[0]] = value
                    self.dims[node.output[0]] = value.shape

    def reshape_sizes(self) -> list[int]:
        """The distinct sizes (2..4096) that Reshape shapes name as constants, in graph order:
        the shape itself or the constants it is assembled from (Concat of Unsqueezed scalars)."""
        sizes: dict[int, None] = {}
        for node in self.nodes:
            if node.op_type != "Reshape" or len(node.input) < 2:
                continue
            frontier = [node.input[1]]
            for _ in range(3):
                following = []
                for name in frontier:
                    if name in self.values:
                        sizes.update(dict.fromkeys(int(v) for v in self.values[name].reshape(-1) if 2 <= v <= 4096))
                    elif name in self.producers and self.producers[name].op_type in ("Concat", "Unsqueeze", "Cast", "Squeeze"):
                        following.extend(n for n in self.producers[name].input if n)
                frontier = following
        return list(sizes)

    def scalar(self, name: str) -> float | None:
        value = self.values.get(name)
        if value is None or value.size != 1:
            return None
        return float(value.reshape(-1)[0])

    def uses(self, name: str) -> Iterator[tuple[object, int, float]]:
        """(node, input index, offset added so far) for each use of `name` and of values it passes
        through unchanged (or shifted by a constant), breadth first, a few nodes deep."""
        frontier, seen = [(name, 0.0)], {name}
        for _ in range(_FOLLOW_DEPTH):
            following = []
            for value, offset in frontier:
                for node, index in self.consumers.get(value, []):
                    yield node, index, offset
                    shift = None
                    if node.op_type in _PASSTHROUGH and index == 0:
                        shift = 0.0
                    elif node.op_type in ("Add", "Sub") and len(node.input) == 2:
                        other = self.scalar(node.input[1 - index])
                        if other is not None and not (node.op_type == "Sub" and index == 1):
                            shift = other if node.op_type == "Add" else -other
                    if shift is not None:
                        for out in node.output:
                            if out and out not in seen:
                                seen.add(out)
                                following.append((out, offset + shift))
            frontier = following
            if not frontier:
                break

    def recurrent_state(self, name: str) -> bool:
        return any(index in _RECURRENT.get(node.op_type, ()) for node, index, _ in self.uses(name))

    def equal_constant(self, name: str) -> float | None:
        for node, index, offset in self.uses(name):
            if node.op_type == "Equal" and len(node.input) == 2:
                other = self.scalar(node.input[1 - index])
                if other is not None:
                    return other - offset
        return None

    def gather_bound(self, name: str) -> int | None:
        bounds = []
        for node, index, offset in self.uses(name):
            if node.op_type not in ("Gather", "GatherElements") or index != 1:
                continue
            dims = self.dims.get(node.input[0])
            if not dims:
                continue
            axis = 0
            for attr in node.attribute:
                if attr.name == "axis":
                    axis = int(attr.i)
            if -len(dims) <= axis < len(dims):
                bounds.append(int(dims[axis] - offset))
        return min(bounds) if bounds else None


def _probe_values(spec: InputSpec, shape: tuple[int, ...], facts: _GraphFacts, rng: np.random.Generator) -> np.ndarray:
    dtype = spec.dtype
    if dtype.kind in "fc" or dtype == numpy_dtype("bfloat16"):
        if _STATE_NAMES.search(spec.name) or facts.recurrent_state(spec.name):
            return np.zeros(shape, dtype)
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        if _MASK_NAMES.search(spec.name):
            return np.ones(shape, dtype)
        return rng.integers(0, 2, shape).astype(dtype)
    info = np.iinfo(dtype)
    # Names first: a mask is typically compared with 0 (mask == 0 marks padding), yet all ones is
    # the realistic mask.
    if _MASK_NAMES.search(spec.name):
        return np.ones(shape, dtype)
    if _ZERO_NAMES.search(spec.name):
        return np.zeros(shape, dtype)
    constant = facts.equal_constant(spec.name)
    if constant is not None and info.min <= constant <= info.max:
        return np.full(shape, int(constant), dtype)
    bound = facts.gather_bound(spec.name)
    if _POSITION_NAMES.search(spec.name) and len(shape) >= 2:
        positions = np.arange(shape[-1]) if bound is None else np.arange(shape[-1]) % max(bound, 1)
        return np.broadcast_to(positions, shape).astype(dtype)
    high = _INTEGER_RANGE if bound is None else max(bound, 1)
    high = int(min(high, info.max))
    low = 0 if info.min <= 0 else info.min
    return rng.integers(low, max(high, low + 1), shape).astype(dtype)
