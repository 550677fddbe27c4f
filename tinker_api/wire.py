"""The Tinker SDK's binary formats: protobuf forward_backward requests in, protobuf
ForwardBackwardOutput and SampleResponse out.

The message classes come from the SDK's own generated module (``tinker.proto``), so the
schema can never drift from the client's. Arrays travel as raw little-endian bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import zstandard
from google.protobuf.message import DecodeError
from tinker.proto import tinker_public_pb2 as pb

from backend.examples import Example
from errors import BadRequestError

PROTOBUF = "application/x-protobuf"
MAX_DECOMPRESSED_BYTES = 512 * 1024 * 1024

_NUMPY = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}


def decompress(body: bytes, content_encoding: str | None) -> bytes:
    if (content_encoding or "").lower() != "zstd":
        return body
    try:
        with zstandard.ZstdDecompressor().stream_reader(body) as reader:
            data = reader.read(MAX_DECOMPRESSED_BYTES + 1)
    except zstandard.ZstdError as exc:
        raise BadRequestError(f"the zstd body does not decompress: {exc}") from None
    if len(data) > MAX_DECOMPRESSED_BYTES:
        raise BadRequestError("the decompressed body is over 512 MiB")
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


def examples(message: pb.ForwardBackwardRequest) -> list[Example]:
    """Each Datum as an Example: the model input's tokens and the loss inputs as tensors."""
    result = []
    for i, datum in enumerate(message.data):
        tokens = []
        for chunk in datum.model_input:
            kind = chunk.WhichOneof("chunk")
            if kind != "encoded_text":
                raise BadRequestError(f"data[{i}].model_input: {kind} chunks are not supported (text models only)")
            tokens.append(np.frombuffer(chunk.encoded_text.tokens, dtype="<i4"))
        inputs = {key: tensor(value, f"data[{i}].loss_fn_inputs.{key}") for key, value in datum.loss_fn_inputs.items()}
        ids = np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.int32)
        result.append(Example(torch.from_numpy(ids.astype(np.int64)), inputs))
    return result


def tensor(message: pb.Tensor, field: str) -> torch.Tensor:
    """A wire Tensor (dense or sparse CSR, absent entries 0) as a dense torch tensor."""
    dtype = _NUMPY.get(message.dtype)
    if dtype is None:
        raise BadRequestError(f"{field}: unsupported dtype {pb.DType.Name(message.dtype)}")
    shape = [int(n) for n in message.shape]
    try:
        if message.WhichOneof("encoding") == "sparse_csr":
            if len(shape) != 2:
                raise BadRequestError(f"{field}: a sparse tensor must be 2-D with a shape")
            csr = message.sparse_csr
            values = torch.from_numpy(np.frombuffer(csr.values, dtype=dtype).copy())
            crow = torch.from_numpy(np.frombuffer(csr.crow_indices, dtype="<i8").copy())
            col = torch.from_numpy(np.frombuffer(csr.col_indices, dtype="<i8").copy())
            # Checked: a malformed CSR from a client must be a 400, never a crash.
            return torch.sparse_csr_tensor(crow, col, values, size=shape, check_invariants=True).to_dense()
        array = np.frombuffer(message.dense, dtype=dtype).copy()
        return torch.from_numpy(array.reshape(shape) if shape else array)
    except (ValueError, RuntimeError) as exc:
        raise BadRequestError(f"{field}: the tensor's data does not match its shape {shape}: {exc}") from None


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
