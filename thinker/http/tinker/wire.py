"""The Tinker SDK's binary formats: protobuf forward_backward requests in, protobuf
ForwardBackwardOutput and SampleResponse out.

The message classes come from the SDK's own generated module (``tinker.proto``), so the
schema can never drift from the client's. Arrays travel as raw little-endian bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import zstandard
from google.protobuf.message import DecodeError
from tinker.proto import tinker_public_pb2 as pb

from backend.train.examples import Example
from thinker.core.errors import BadRequestError, PayloadTooLargeError, clip

PROTOBUF = "application/x-protobuf"
MAX_DECOMPRESSED_BYTES = 512 * 1024 * 1024  # without a server's own limit (MAX_BODY_BYTES)

_NUMPY = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}


def decompress(body: bytes, content_encoding: str | None, limit: int = MAX_DECOMPRESSED_BYTES) -> bytes:
    """The body, zstd-decompressed if so encoded, refused (413) past ``limit`` bytes: a small
    compressed body can expand a thousandfold."""
    if (content_encoding or "").lower() != "zstd":
        return body
    try:
        with zstandard.ZstdDecompressor().stream_reader(body) as reader:
            data = reader.read(limit + 1)
    except zstandard.ZstdError as exc:
        raise BadRequestError(f"the zstd body does not decompress: {clip(str(exc))}") from None
    if len(data) > limit:
        raise PayloadTooLargeError(f"the decompressed body is over the limit of {limit} bytes (MAX_BODY_BYTES)")
    return data


def parse_forward_backward(body: bytes) -> pb.ForwardBackwardRequest:
    message = pb.ForwardBackwardRequest()
    try:
        message.ParseFromString(body)
    except DecodeError as exc:
        raise BadRequestError(f"the body is not a ForwardBackwardRequest protobuf: {exc}") from None
    return message


def loss_config(message: pb.ForwardBackwardRequest) -> dict[str, float | str]:
    """loss_fn_config, the v2 map (numbers and strings) winning over the legacy one."""
    config: dict[str, float | str] = dict(message.loss_fn_config)
    for key, value in message.loss_fn_config_v2.items():
        config[key] = value.number if value.WhichOneof("value") == "number" else value.text
    return config


@dataclass(frozen=True)
class Bounds:
    """What one forward_backward may declare, checked on the tensors' headers before any is
    built: a CSR tensor of a few bytes can declare gigabytes of dense values."""

    max_k: int  # K, targets per position of (T, K) targets (MAX_TARGET_K)
    max_elements: int  # examples x longest T x widest K, the padded values it expands to (MAX_REQUEST_ELEMENTS)


def input_lengths(message: pb.ForwardBackwardRequest) -> list[int]:
    """Each datum's model-input tokens, counted from the chunks' sizes (nothing is decoded)."""
    lengths = []
    for i, datum in enumerate(message.data):
        count = 0
        for chunk in datum.model_input:
            kind = chunk.WhichOneof("chunk")
            if kind != "encoded_text":
                raise BadRequestError(f"data[{i}].model_input: {kind} chunks are not supported (text models only)")
            size = len(chunk.encoded_text.tokens)
            if size % 4:
                raise BadRequestError(f"data[{i}].model_input: {size} bytes of tokens is not a whole number of int32s")
            count += size // 4
        lengths.append(count)
    return lengths


def examples(message: pb.ForwardBackwardRequest, bounds: Bounds) -> list[Example]:
    """Each Datum as an Example: the model input's tokens and the loss inputs as tensors.
    Every header is checked against ``bounds`` first; only then is anything decoded."""
    lengths = input_lengths(message)
    widest = 1
    for i, datum in enumerate(message.data):
        for key, value in datum.loss_fn_inputs.items():
            shape = checked_shape(value, f"data[{i}].loss_fn_inputs.{key}", lengths[i], bounds.max_k)
            widest = max([widest, *shape[1:]])
    dense = len(lengths) * max(lengths, default=0) * widest
    if dense > bounds.max_elements:
        raise BadRequestError(
            f"data: {len(lengths)} examples x {max(lengths)} positions x {widest} targets = {dense} values, over "
            f"this server's limit of {bounds.max_elements} per request (MAX_REQUEST_ELEMENTS)"
        )
    result = []
    for i, datum in enumerate(message.data):
        ids = np.concatenate([np.frombuffer(c.encoded_text.tokens, dtype="<i4") for c in datum.model_input] or [[]])
        inputs = {
            key: tensor(value, f"data[{i}].loss_fn_inputs.{key}", lengths[i], bounds.max_k)
            for key, value in datum.loss_fn_inputs.items()
        }
        result.append(Example(torch.from_numpy(ids.astype(np.int64)), inputs))
    return result


def checked_shape(message: pb.Tensor, field: str, rows: int | None = None, max_k: int | None = None) -> list[int]:
    """The tensor's shape, (T,) or (T, K), once its header is consistent: sizes >= 0, T equal
    to ``rows``, 1 <= K <= ``max_k``, and data of exactly the size the shape needs."""
    dtype = _NUMPY.get(message.dtype)
    if dtype is None:
        raise BadRequestError(f"{field}: unsupported dtype {pb.DType.Name(message.dtype)}")
    itemsize = np.dtype(dtype).itemsize
    sparse = message.WhichOneof("encoding") == "sparse_csr"
    shape = [int(n) for n in message.shape]
    if not shape and not sparse:  # a bare 1-D array
        shape = [len(message.dense) // itemsize]
    if len(shape) not in ((2,) if sparse else (1, 2)) or min(shape) < 0:
        kinds = "2-D (T, K)" if sparse else "(T,) or (T, K)"
        raise BadRequestError(f"{field}: shape {clip(str(shape))} is not a {kinds} shape of sizes >= 0")
    if rows is not None and shape[0] != rows:
        raise BadRequestError(f"{field}: shape {shape} does not match the {rows} input tokens")
    if len(shape) == 2 and max_k is not None and not 1 <= shape[1] <= max_k:
        raise BadRequestError(
            f"{field}: shape {shape} has K={shape[1]} targets per position; this server takes 1 to {max_k} "
            "(MAX_TARGET_K)"
        )
    values = shape[0] * (shape[1] if len(shape) == 2 else 1)
    if sparse:
        csr = message.sparse_csr
        nnz = len(csr.values) // itemsize
        if (
            len(csr.values) % itemsize
            or len(csr.col_indices) != nnz * 8
            or len(csr.crow_indices) != (shape[0] + 1) * 8
            or nnz > values
        ):
            raise BadRequestError(f"{field}: the sparse CSR arrays' sizes do not fit its shape {shape}")
    elif len(message.dense) != values * itemsize:
        raise BadRequestError(
            f"{field}: {len(message.dense)} bytes of data, but its shape {shape} needs {values * itemsize}"
        )
    return shape


def tensor(message: pb.Tensor, field: str, rows: int | None = None, max_k: int | None = None) -> torch.Tensor:
    """A wire Tensor (dense or sparse CSR, absent entries 0) as a dense torch tensor, its
    header checked first (see checked_shape); float values must be finite."""
    shape = checked_shape(message, field, rows, max_k)
    dtype = _NUMPY[message.dtype]
    try:
        if message.WhichOneof("encoding") == "sparse_csr":
            csr = message.sparse_csr
            values = torch.from_numpy(np.frombuffer(csr.values, dtype=dtype).copy())
            crow = torch.from_numpy(np.frombuffer(csr.crow_indices, dtype="<i8").copy())
            col = torch.from_numpy(np.frombuffer(csr.col_indices, dtype="<i8").copy())
            # Checked: a malformed CSR from a client must be a 400, never a crash.
            result = torch.sparse_csr_tensor(crow, col, values, size=shape, check_invariants=True).to_dense()
        else:
            result = torch.from_numpy(np.frombuffer(message.dense, dtype=dtype).copy().reshape(shape))
    except (ValueError, RuntimeError) as exc:
        reason = clip(str(exc))
        raise BadRequestError(f"{field}: the tensor's data does not match its shape {shape}: {reason}") from None
    if result.is_floating_point() and not bool(torch.isfinite(result).all()):
        raise BadRequestError(f"{field}: values must be finite (no NaN or infinity)")
    return result


def forward_backward_output(logprobs: Sequence, metrics: Mapping[str, float]) -> bytes:
    """ForwardBackwardOutput: one ``logprobs`` array per datum (shaped like its targets).
    Datums go into one ArrayRecord per run of equal trailing shape, as the format requires."""
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for key, value in metrics.items():
        out.metrics[key] = float(value)
    runs: list[list[np.ndarray]] = []
    for values in logprobs:
        array = np.ascontiguousarray(np.asarray(values, dtype="<f4"))  # tensors, or lists after a restart
        if runs and runs[-1][0].shape[1:] == array.shape[1:]:
            runs[-1].append(array)
        else:
            runs.append([array])
    for run in runs:
        record = out.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(run))
        field = record.fields["logprobs"]
        field.dtype = pb.DTYPE_FLOAT32
        field.trailing_shape.extend(run[0].shape[1:])
        field.offsets = np.cumsum([0] + [a.nbytes for a in run]).astype("<i8").tobytes()  # byte offsets
        field.data = b"".join(a.tobytes() for a in run)
    return out.SerializeToString()


def sample_response(result: Mapping) -> bytes:
    """SampleResponse from the sampling job's result (see tinker_api.routes)."""
    out = pb.SampleResponse()
    for sequence in result["sequences"]:
        seq = out.sequences.add()
        seq.stop_reason = pb.STOP_REASON_STOP if sequence["stop_reason"] == "stop" else pb.STOP_REASON_LENGTH
        seq.tokens = np.asarray(sequence["tokens"], dtype="<i4").tobytes()
        seq.logprobs = np.asarray(sequence["logprobs"], dtype="<f4").tobytes()
    if result.get("prompt_logprobs") is not None:
        values = [np.nan if v is None else v for v in result["prompt_logprobs"]]  # NaN: no value
        out.prompt_logprobs = np.asarray(values, dtype="<f4").tobytes()
    top = result.get("topk_prompt_logprobs")
    if top:
        k = max((len(row) for row in top if row), default=0)
        ids = np.zeros((len(top), k), dtype="<i4")
        values = np.full((len(top), k), -99999.0, dtype="<f4")  # (0, -99999): the "no entry" sentinel
        for t, row in enumerate(top):
            for j, (token, logprob) in enumerate(row or []):
                ids[t, j], values[t, j] = token, logprob
        out.topk_prompt_logprobs.CopyFrom(
            pb.TopkLogprobs(token_ids=ids.tobytes(), logprobs=values.tobytes(), k=k, length=len(top))
        )
    return out.SerializeToString()
