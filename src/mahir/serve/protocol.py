"""The Open Inference Protocol (KServe v2) over HTTP: request bodies to numpy, numpy to bodies.

Both encodings `tritonclient.http` speaks: plain JSON tensors (`data` as a flat row-major list)
and the binary tensor extension, where the JSON header is followed by raw little-endian tensor
bytes, its length in the `Inference-Header-Content-Length` header and each tensor's size in its
`binary_data_size` parameter. Every check names what was wrong and what was expected, since the
message is all a client sees. Knows nothing of models or batching.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from mahir.errors import Malformed, Mismatch
from mahir.types import TensorSpec

HEADER_LENGTH = "inference-header-content-length"

DATATYPES: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}
NUMPY_TYPES = {v: k for k, v in DATATYPES.items()}
BYTES = "BYTES"
"""Variable-length byte strings, held as numpy object arrays of `bytes` (encoded images in,
class names out)."""


def read_json(body: bytes) -> Any:
    """Strict JSON: NaN, Infinity and unpaired surrogates (which `json` lets through, to fail
    later inside a model or a tokenizer) are refused here."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise Malformed(f"the body is not JSON ({err}): send standard JSON (RFC 8259)") from err


@dataclass(frozen=True, slots=True)
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...]
    """Outputs asked for; empty: all."""
    binary_outputs: frozenset[str]
    """Outputs to return as binary data rather than JSON lists."""
    binary_all: bool = False
    """`binary_data_output` was asked for the whole request: with no outputs named, every
    output comes back binary (what `tritonclient` asks for when it names none)."""
    classification: Mapping[str, int] = field(default_factory=dict)
    """Outputs asked for as their top k classes (Triton's classification extension: the
    output's `classification` parameter, tritonclient's `class_count`)."""


Decoder = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
"""Turns a request's BYTES inputs (encoded images: `images.py`) into the model's inputs."""


def parse_infer(
    body: bytes,
    header_length: int | None,
    spec: Sequence[TensorSpec],
    decode: Decoder | None = None,
) -> InferRequest:
    """Decode and check one request against the model's inputs; BYTES inputs go through
    `decode` first, for models that have one."""
    header, binary = (body, b"") if header_length is None else _split_binary(body, header_length)
    request = read_json(header)
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise Malformed('the request needs "inputs": a list of {name, shape, datatype, data}')
    arrays, offset = {}, 0
    for item in request["inputs"]:
        name, array, offset = _read_tensor(item, binary, offset)
        arrays[name] = array
    if offset != len(binary):
        raise Malformed(f"{len(binary) - offset} bytes of binary data belong to no input")
    if decode is not None and any(a.dtype == object for a in arrays.values()):
        arrays = decode(arrays)
    _check_against_spec(arrays, spec)
    wanted = request.get("outputs") or []
    if not isinstance(wanted, list) or not all(isinstance(o, dict) and "name" in o for o in wanted):
        raise Malformed('"outputs" must be a list of {"name": ...}')
    binary_all = bool((request.get("parameters") or {}).get("binary_data_output", False))
    binary_outputs = {
        o["name"] for o in wanted if (o.get("parameters") or {}).get("binary_data", binary_all)
    }
    classification = {
        o["name"]: _class_count(o)
        for o in wanted
        if (o.get("parameters") or {}).get("classification")
    }
    return InferRequest(
        id=request.get("id"),
        inputs=arrays,
        outputs=tuple(o["name"] for o in wanted),
        binary_outputs=frozenset(binary_outputs),
        binary_all=binary_all,
        classification=classification,
    )


def _class_count(output: dict[str, Any]) -> int:
    count = output["parameters"]["classification"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise Malformed(
            f"output {output['name']!r}: classification must be a class count >= 1, got {count!r}"
        )
    return count


def _split_binary(body: bytes, header_length: int) -> tuple[bytes, bytes]:
    if not 0 < header_length <= len(body):
        raise Malformed(f"{HEADER_LENGTH} is {header_length}, but the body has {len(body)} bytes")
    return body[:header_length], body[header_length:]


def _read_tensor(item: Any, binary: bytes, offset: int) -> tuple[str, np.ndarray, int]:
    if not isinstance(item, dict) or not {"name", "shape", "datatype"} <= item.keys():
        raise Malformed("each input needs name, shape and datatype")
    name, shape, datatype = item["name"], item["shape"], item["datatype"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise Malformed(f"input {name!r}: shape must be a list of non-negative integers")
    size = (item.get("parameters") or {}).get("binary_data_size")
    if datatype == BYTES:
        return _read_bytes(name, shape, item, binary, offset, size)
    if datatype not in NUMPY_TYPES:
        raise Mismatch(
            f"input {name!r}: datatype {datatype!r} is not one of {sorted([*NUMPY_TYPES, BYTES])}"
        )
    dtype = np.dtype(NUMPY_TYPES[datatype])
    if size is not None:
        if not isinstance(size, int) or size < 0 or size % dtype.itemsize:
            raise Malformed(
                f"input {name!r}: binary_data_size {size!r} is not a whole number of "
                f"{datatype} values ({dtype.itemsize} bytes each)"
            )
        chunk = binary[offset : offset + size]
        if len(chunk) != size:
            raise Malformed(f"input {name!r}: {size} binary bytes announced, {len(chunk)} sent")
        flat = np.frombuffer(chunk, dtype=dtype.newbyteorder("<"))
        offset += size
    else:
        if "data" not in item:
            raise Malformed(f"input {name!r} has neither data nor binary_data_size")
        try:
            flat = np.asarray(item["data"], dtype=dtype).reshape(-1)
        except (TypeError, ValueError) as err:
            raise Mismatch(f"input {name!r}: data is not {datatype} ({err})") from err
    if flat.size != int(np.prod(shape)):
        raise Mismatch(
            f"input {name!r}: shape {shape} needs {int(np.prod(shape))} values, got {flat.size}"
        )
    return name, flat.reshape(shape).astype(dtype, copy=False), offset


def _read_bytes(
    name: str, shape: list[int], item: dict[str, Any], binary: bytes, offset: int, size: int | None
) -> tuple[str, np.ndarray, int]:
    """A BYTES tensor as an object array of `bytes`: in binary, each element its 4-byte
    little-endian length then its bytes; in JSON, strings (their UTF-8 bytes)."""
    count = int(np.prod(shape))
    if size is None:
        data = item.get("data")
        if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
            raise Malformed(f"input {name!r}: BYTES data must be a list of strings")
        elements = [d.encode() for d in data]
    else:
        chunk, offset = binary[offset : offset + size], offset + size
        if len(chunk) != size:
            raise Malformed(f"input {name!r}: {size} binary bytes announced, {len(chunk)} sent")
        elements, at = [], 0
        while at < len(chunk):
            length = int.from_bytes(chunk[at : at + 4], "little")
            element = chunk[at + 4 : at + 4 + length]
            if at + 4 > len(chunk) or len(element) != length:
                raise Malformed(f"input {name!r}: element {len(elements)} overruns its bytes")
            elements.append(element)
            at += 4 + length
    if len(elements) != count:
        raise Mismatch(f"input {name!r}: shape {shape} needs {count} values, got {len(elements)}")
    array = np.empty(count, dtype=object)
    array[:] = elements
    return name, array.reshape(shape), offset


def _check_against_spec(arrays: Mapping[str, np.ndarray], spec: Sequence[TensorSpec]) -> None:
    expected = {t.name: t for t in spec}
    if arrays.keys() != expected.keys():
        raise Mismatch(f"inputs must be exactly {sorted(expected)}, got {sorted(arrays)}")
    batch = {a.shape[0] if a.ndim else None for a in arrays.values()}
    if len(batch) != 1:
        raise Mismatch(
            f"all inputs must share the batch size (axis 0), got {sorted(map(str, batch))}"
        )
    for name, array in arrays.items():
        tensor = expected[name]
        if array.dtype != np.dtype(tensor.dtype):
            raise Mismatch(
                f"input {name!r} is {DATATYPES.get(array.dtype.name, BYTES)}, the model takes "
                f"{DATATYPES.get(tensor.dtype, tensor.dtype)}"
            )
        if array.ndim != len(tensor.shape) or any(
            isinstance(d, int) and d != n for d, n in zip(tensor.shape, array.shape, strict=True)
        ):
            raise Mismatch(
                f"input {name!r} has shape {list(array.shape)}, expected {v2_shape(tensor.shape)}"
            )


def v2_shape(shape: Sequence[int | str]) -> list[int]:
    """A spec shape as the protocol writes it: -1 for every dynamic axis."""
    return [d if isinstance(d, int) else -1 for d in shape]


def encode_infer(
    model: str, request: InferRequest, outputs: Mapping[str, np.ndarray]
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it."""
    names = request.outputs or tuple(outputs)
    unknown = [n for n in names if n not in outputs]
    if unknown:
        raise Mismatch(f"no outputs {unknown}; the model gives {sorted(outputs)}")
    entries, chunks = [], []
    for name in names:
        array = np.ascontiguousarray(outputs[name])
        entry: dict[str, Any] = {
            "name": name,
            "shape": list(array.shape),
            "datatype": DATATYPES.get(array.dtype.name, BYTES),
        }
        if name in request.binary_outputs or (request.binary_all and not request.outputs):
            raw = _raw(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise Mismatch(
                    f"output {name!r} holds NaN or infinity, which JSON cannot carry: "
                    "ask for it as binary data"
                )
            flat = array.reshape(-1).tolist()
            entry["data"] = [x.decode() for x in flat] if array.dtype == object else flat
        entries.append(entry)
    body: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": entries}
    if request.id is not None:
        body["id"] = request.id
    header = json.dumps(body).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def _raw(array: np.ndarray) -> bytes:
    """A tensor's binary form: little-endian values, or for BYTES length-prefixed elements."""
    if array.dtype != object:
        return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    return b"".join(len(x).to_bytes(4, "little") + x for x in array.reshape(-1).tolist())
