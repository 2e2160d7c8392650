"""The protobuf side of the wire: the `tinker_public` schema and codecs for the three proto bodies.

Since SDK 0.25, forward_backward requests and the results of forward_backward and sample travel as
protobuf. The schema is declared here as data and registered at import, so no generated code (and
no protoc version) is tied to the protobuf runtime the user happens to have.
"""

from __future__ import annotations

import math

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from ._model_input import (
    Datum,
    DmelChunk,
    EncodedTextChunk,
    ImageChunk,
    ModelInput,
    PromptProvenanceSpan,
    SampledProvenanceSpan,
)
from ._api import PromptAltTokens
from ._sampling import TOPK_SENTINEL, SampledSequence, SampleResponse, topk_rows
from ._tensor import TensorData
from ._training import ForwardBackwardInput, ForwardBackwardOutput

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "string": _F.TYPE_STRING, "bytes": _F.TYPE_BYTES, "bool": _F.TYPE_BOOL, "double": _F.TYPE_DOUBLE,
    "float": _F.TYPE_FLOAT, "int32": _F.TYPE_INT32, "int64": _F.TYPE_INT64, "uint32": _F.TYPE_UINT32,
    "uint64": _F.TYPE_UINT64,
}
_PACKAGE = "tinker_public"

# name -> [(field name, number, type, label)], where label is "" (singular), "repeated",
# "optional" (proto3 presence), "oneof:<name>" or "map:<key type>".
_MESSAGES: dict[str, list[tuple[str, int, str, str]]] = {
    "LossConfigValue": [("number", 1, "double", "oneof:value"), ("text", 2, "string", "oneof:value")],
    "ForwardBackwardRequest": [
        ("model_id", 1, "string", ""), ("seq_id", 2, "int32", ""), ("data", 3, "Datum", "repeated"),
        ("loss_fn", 4, "string", ""), ("loss_fn_config", 5, "double", "map:string"),
        ("forward_only", 6, "bool", ""), ("loss_fn_config_v2", 7, "LossConfigValue", "map:string"),
    ],
    "Datum": [
        ("model_input", 1, "Chunk", "repeated"), ("loss_fn_inputs", 2, "Tensor", "map:string"),
        ("model_input_spans", 3, "ProvenanceSpan", "repeated"),
        ("loss_fn_input_spans", 4, "ProvenanceSpan", "repeated"),
    ],
    "Chunk": [
        ("encoded_text", 1, "EncodedTextChunk", "oneof:chunk"), ("image", 2, "ImageChunk", "oneof:chunk"),
        ("dmel", 3, "DmelChunk", "oneof:chunk"),
    ],
    "EncodedTextChunk": [("tokens", 1, "bytes", "")],
    "ImageChunk": [
        ("data", 1, "bytes", ""), ("format", 2, "string", ""), ("expected_tokens", 3, "int32", "optional"),
        ("override_dimensions", 4, "ImageDimensions", "optional"),
    ],
    "ImageDimensions": [("width", 1, "uint32", ""), ("height", 2, "uint32", "")],
    "DmelChunk": [("dmel", 1, "bytes", "")],
    "ProvenanceSpan": [
        ("prompt_tokens", 1, "PromptProvenanceSpan", "oneof:span"),
        ("sampled_tokens", 2, "SampledProvenanceSpan", "oneof:span"),
    ],
    "PromptProvenanceSpan": [("sequence_id", 1, "string", ""), ("offset", 2, "int64", ""), ("length", 3, "int64", "")],
    "SampledProvenanceSpan": [("sequence_id", 1, "string", ""), ("offset", 2, "int64", ""), ("length", 3, "int64", "")],
    "Tensor": [
        ("dense", 1, "bytes", "oneof:encoding"), ("sparse_csr", 2, "SparseCsr", "oneof:encoding"),
        ("dtype", 3, "DType", ""), ("shape", 4, "int64", "repeated"),
    ],
    "SparseCsr": [("values", 1, "bytes", ""), ("crow_indices", 2, "bytes", ""), ("col_indices", 3, "bytes", "")],
    "ForwardBackwardOutput": [
        ("loss_fn_output_type", 1, "string", ""), ("loss_fn_outputs", 2, "ArrayRecord", "repeated"),
        ("metrics", 3, "double", "map:string"),
    ],
    "ArrayRecord": [
        ("type_tag", 1, "string", ""), ("fields", 2, "BatchedTensor", "map:string"), ("num_datums", 3, "int64", ""),
    ],
    "BatchedTensor": [
        ("data", 1, "bytes", ""), ("offsets", 2, "bytes", ""), ("dtype", 3, "DType", ""),
        ("trailing_shape", 4, "int64", "repeated"),
    ],
    "SampleResponse": [
        ("sequences", 1, "SampledSequence", "repeated"), ("prompt_logprobs", 2, "bytes", "optional"),
        ("topk_prompt_logprobs", 3, "TopkLogprobs", "optional"), ("prompt_cache_hit_tokens", 4, "int32", ""),
        ("target_prompt_logprobs", 5, "Tensor", "optional"), ("prompt_alt_tokens", 6, "PromptAltTokens", "optional"),
    ],
    "SampledSequence": [
        ("stop_reason", 1, "StopReason", ""), ("tokens", 2, "bytes", ""), ("logprobs", 3, "bytes", "optional"),
        ("topk_sampled_logprobs", 4, "TopkLogprobs", "optional"),
    ],
    "TopkLogprobs": [
        ("token_ids", 1, "bytes", ""), ("logprobs", 2, "bytes", ""), ("k", 3, "uint32", ""), ("length", 4, "uint32", ""),
    ],
    "PromptAltTokens": [("tokens", 1, "Tensor", ""), ("logprobs", 2, "Tensor", "")],
}
_ENUMS = {
    "StopReason": ["STOP_REASON_STOP", "STOP_REASON_LENGTH"],
    "DType": ["DTYPE_UNSPECIFIED", "DTYPE_FLOAT32", "DTYPE_INT64", "DTYPE_INT32", "DTYPE_BFLOAT16"],
}


def _set_type(field: descriptor_pb2.FieldDescriptorProto, type_name: str) -> None:
    if type_name in _SCALARS:
        field.type = _SCALARS[type_name]
    else:
        field.type = _F.TYPE_ENUM if type_name in _ENUMS else _F.TYPE_MESSAGE
        field.type_name = f".{_PACKAGE}.{type_name}"


def _build_file() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(name="tinkex/tinker_public.proto", package=_PACKAGE, syntax="proto3")
    for name, values in _ENUMS.items():
        enum = file.enum_type.add(name=name)
        for number, value in enumerate(values):
            enum.value.add(name=value, number=number)
    for name, fields in _MESSAGES.items():
        message = file.message_type.add(name=name)
        oneofs: dict[str, int] = {}
        for field_name, number, type_name, label in fields:
            field = message.field.add(name=field_name, number=number, json_name=field_name)
            field.label = _F.LABEL_OPTIONAL
            if label == "repeated":
                field.label = _F.LABEL_REPEATED
                _set_type(field, type_name)
            elif label.startswith("map:"):
                entry_name = "".join(part.title() for part in field_name.split("_")) + "Entry"
                entry = message.nested_type.add(name=entry_name)
                entry.options.map_entry = True
                key = entry.field.add(name="key", number=1, label=_F.LABEL_OPTIONAL, json_name="key")
                _set_type(key, label[4:])
                value = entry.field.add(name="value", number=2, label=_F.LABEL_OPTIONAL, json_name="value")
                _set_type(value, type_name)
                field.label = _F.LABEL_REPEATED
                field.type = _F.TYPE_MESSAGE
                field.type_name = f".{_PACKAGE}.{name}.{entry_name}"
            else:
                _set_type(field, type_name)
                if label.startswith("oneof:"):
                    oneof = label[6:]
                    if oneof not in oneofs:
                        oneofs[oneof] = len(message.oneof_decl)
                        message.oneof_decl.add(name=oneof)
                    field.oneof_index = oneofs[oneof]
                elif label == "optional" and type_name in _SCALARS:
                    # proto3 `optional` is a synthetic oneof; synthetic ones must come after real ones,
                    # which holds because every message lists its real oneof fields first.
                    field.proto3_optional = True
                    oneofs[f"_{field_name}"] = len(message.oneof_decl)
                    message.oneof_decl.add(name=f"_{field_name}")
                    field.oneof_index = oneofs[f"_{field_name}"]
    return file


_pool = descriptor_pool.DescriptorPool()
_pool.Add(_build_file())
pb = type("pb", (), {name: message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
                     for name in _MESSAGES})

_DTYPE_CODES = {"float32": 1, "int64": 2}
_CODE_DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<i8"), 3: np.dtype("<i4"), 4: np.dtype("<u2")}


class ProtoDecodeError(ValueError):
    """A protobuf body that does not parse or does not describe valid tensors."""


def _array(blob: bytes, code: int) -> np.ndarray:
    if code not in _CODE_DTYPES:
        raise ProtoDecodeError(f"unknown tensor dtype code {code}")
    dtype = _CODE_DTYPES[code]
    if len(blob) % dtype.itemsize:
        raise ProtoDecodeError(f"{len(blob)} bytes is not a whole number of {dtype} values")
    values = np.frombuffer(blob, dtype=dtype)
    if code == 4:  # bfloat16 bits: the high half of a float32
        values = (values.astype(np.uint32) << 16).view(np.float32)
    return values


# ---- forward_backward request -------------------------------------------------------------------

def _tensor_to_proto(tensor: TensorData, message) -> None:
    message.dtype = _DTYPE_CODES[tensor.dtype]
    np_dtype = _CODE_DTYPES[_DTYPE_CODES[tensor.dtype]]
    values = np.asarray(tensor.data, dtype=np_dtype).tobytes()
    if tensor.is_sparse:
        message.sparse_csr.values = values
        message.sparse_csr.crow_indices = np.asarray(tensor.sparse_crow_indices, dtype="<i8").tobytes()
        message.sparse_csr.col_indices = np.asarray(tensor.sparse_col_indices, dtype="<i8").tobytes()
    else:
        message.dense = values
    message.shape.extend(tensor.shape if tensor.shape is not None else [len(tensor.data)])


def _tensor_from_proto(message) -> TensorData:
    if message.dtype not in _DTYPE_CODES.values():
        raise ProtoDecodeError(f"loss inputs are float32 or int64, not dtype code {message.dtype}")
    dtype = "float32" if message.dtype == 1 else "int64"
    shape = list(message.shape)
    if message.WhichOneof("encoding") == "sparse_csr":
        csr = message.sparse_csr
        return TensorData(data=_array(csr.values, message.dtype).tolist(), dtype=dtype, shape=shape,
                          sparse_crow_indices=_array(csr.crow_indices, 2).tolist(),
                          sparse_col_indices=_array(csr.col_indices, 2).tolist())
    values = _array(message.dense, message.dtype)
    return TensorData(data=values.tolist(), dtype=dtype, shape=shape or [len(values)])


def _span_to_proto(span, message) -> None:
    target = message.prompt_tokens if isinstance(span, PromptProvenanceSpan) else message.sampled_tokens
    target.sequence_id, target.offset, target.length = span.sequence_id, span.offset, span.length


def _span_from_proto(message):
    kind = message.WhichOneof("span")
    if kind is None:
        raise ProtoDecodeError("a provenance span with neither prompt_tokens nor sampled_tokens")
    inner = getattr(message, kind)
    cls = PromptProvenanceSpan if kind == "prompt_tokens" else SampledProvenanceSpan
    return cls(sequence_id=inner.sequence_id, offset=inner.offset, length=inner.length)


def encode_forward_backward_request(
    model_id: str, seq_id: int, data: list[Datum], loss_fn: str,
    loss_fn_config: dict[str, float | str] | None = None, forward_only: bool = False,
) -> bytes:
    request = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn=loss_fn, forward_only=forward_only)
    for key, value in (loss_fn_config or {}).items():
        if isinstance(value, str):
            request.loss_fn_config_v2[key].text = value
        else:
            request.loss_fn_config[key] = float(value)
            request.loss_fn_config_v2[key].number = float(value)
    for datum in data:
        message = request.data.add()
        for chunk in datum.model_input.chunks:
            if isinstance(chunk, EncodedTextChunk):
                message.model_input.add().encoded_text.tokens = np.asarray(chunk.tokens, dtype="<i4").tobytes()
            elif isinstance(chunk, ImageChunk):
                image = message.model_input.add().image
                image.data, image.format = chunk.data, chunk.format
                if chunk.expected_tokens is not None:
                    image.expected_tokens = chunk.expected_tokens
            elif isinstance(chunk, DmelChunk):
                message.model_input.add().dmel.dmel = chunk.dmel
            else:
                raise ValueError("image asset pointers cannot be sent to forward_backward; send the image bytes")
        for key, tensor in datum.loss_fn_inputs.items():
            _tensor_to_proto(tensor, message.loss_fn_inputs[key])
        for span in datum.model_input_spans or []:
            _span_to_proto(span, message.model_input_spans.add())
        for span in datum.loss_fn_input_spans or []:
            _span_to_proto(span, message.loss_fn_input_spans.add())
    return request.SerializeToString()


def decode_forward_backward_request(body: bytes) -> tuple[str, int, ForwardBackwardInput, bool]:
    """Returns (model_id, seq_id, input, forward_only); ProtoDecodeError or ValueError on bad bodies."""
    request = pb.ForwardBackwardRequest()
    try:
        request.ParseFromString(body)
    except Exception as exc:  # the runtime raises DecodeError, or RuntimeError in some builds
        raise ProtoDecodeError(f"the body is not a valid ForwardBackwardRequest protobuf: {exc}") from None
    config: dict[str, float | str] = dict(request.loss_fn_config)
    for key, value in request.loss_fn_config_v2.items():
        kind = value.WhichOneof("value")
        if kind is not None:
            config[key] = getattr(value, kind)
    data = []
    for message in request.data:
        chunks = []
        for chunk in message.model_input:
            kind = chunk.WhichOneof("chunk")
            if kind == "encoded_text":
                chunks.append(EncodedTextChunk(tokens=_array(chunk.encoded_text.tokens, 3).tolist()))
            elif kind == "image":
                image = chunk.image
                if image.format not in ("png", "jpeg"):
                    raise ProtoDecodeError(f"image format must be png or jpeg, not {image.format!r}")
                expected = image.expected_tokens if image.HasField("expected_tokens") else None
                chunks.append(ImageChunk(data=image.data, format=image.format, expected_tokens=expected))
            elif kind == "dmel":
                chunks.append(DmelChunk(dmel=chunk.dmel.dmel))
            else:
                raise ProtoDecodeError("an empty model_input chunk")
        data.append(Datum(
            model_input=ModelInput(chunks=chunks),
            loss_fn_inputs={key: _tensor_from_proto(t) for key, t in message.loss_fn_inputs.items()},
            model_input_spans=[_span_from_proto(s) for s in message.model_input_spans] or None,
            loss_fn_input_spans=[_span_from_proto(s) for s in message.loss_fn_input_spans] or None,
        ))
    fb_input = ForwardBackwardInput(data=data, loss_fn=request.loss_fn, loss_fn_config=config or None)
    return request.model_id, request.seq_id, fb_input, request.forward_only


# ---- forward_backward result --------------------------------------------------------------------

def encode_forward_backward_output(output: ForwardBackwardOutput) -> bytes:
    """ArrayRecords of datums: each field is the datums' values concatenated with int64 byte offsets.

    A record shares one trailing shape per field, so a run of datums whose shapes differ in rank
    (1-D hard targets beside 2-D soft ones) starts a new record; the SDK concatenates records.
    """
    message = pb.ForwardBackwardOutput(loss_fn_output_type=output.loss_fn_output_type)
    for key, value in output.metrics.items():
        message.metrics[key] = float(value)
    runs: list[list[dict[str, np.ndarray]]] = []
    signature = None
    for out in output.loss_fn_outputs:
        arrays = {key: tensor.to_numpy() for key, tensor in out.items()}
        this = _signature(arrays)
        if this != signature:
            runs.append([])
            signature = this
        runs[-1].append(arrays)
    for run in runs:
        record = message.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(run))
        for key, (dtype, trailing) in _signature(run[0]).items():
            code = _DTYPE_CODES[dtype]
            blobs = [np.ascontiguousarray(arrays[key], dtype=_CODE_DTYPES[code]).tobytes() for arrays in run]
            offsets = np.zeros(len(blobs) + 1, dtype="<i8")
            np.cumsum([len(b) for b in blobs], out=offsets[1:])
            field = record.fields[key]
            field.data, field.offsets, field.dtype = b"".join(blobs), offsets.tobytes(), code
            field.trailing_shape.extend(trailing)
    return message.SerializeToString()


def _signature(arrays: dict[str, np.ndarray]) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {key: ("int64" if array.dtype.kind == "i" else "float32", array.shape[1:]) for key, array in arrays.items()}


def decode_forward_backward_output(body: bytes) -> ForwardBackwardOutput:
    message = pb.ForwardBackwardOutput()
    message.ParseFromString(body)
    outputs: list[dict[str, TensorData]] = []
    for record in message.loss_fn_outputs:
        per_datum: list[dict[str, TensorData]] = [{} for _ in range(record.num_datums)]
        for key, field in record.fields.items():
            offsets = _array(field.offsets, 2)
            if not per_datum:
                per_datum = [{} for _ in range(len(offsets) - 1)]
            trailing = list(field.trailing_shape)
            for i in range(len(offsets) - 1):
                values = _array(field.data[offsets[i]:offsets[i + 1]], field.dtype)
                lead = values.size // max(1, int(np.prod(trailing))) if trailing else values.size
                array = values.reshape([lead, *trailing])
                per_datum[i][key] = TensorData.from_numpy(array)
        outputs.extend(per_datum)
    output_type = message.loss_fn_output_type.rsplit(":", 1)[-1] or "ArrayRecord"
    return ForwardBackwardOutput(loss_fn_output_type=output_type, loss_fn_outputs=outputs,
                                 metrics=dict(message.metrics))


# ---- sample result ------------------------------------------------------------------------------

def _topk_to_proto(ids: np.ndarray, logprobs: np.ndarray, message) -> None:
    message.token_ids = np.ascontiguousarray(ids, dtype="<i4").tobytes()
    message.logprobs = np.ascontiguousarray(logprobs, dtype="<f4").tobytes()
    message.length, message.k = ids.shape


def _topk_from_proto(message) -> tuple[np.ndarray, np.ndarray] | None:
    if message.length == 0 or message.k == 0:
        return None
    shape = (message.length, message.k)
    return _array(message.token_ids, 3).reshape(shape), _array(message.logprobs, 1).reshape(shape)


def _topk_table(rows: list[list[tuple[int, float]] | None], k: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), k), TOPK_SENTINEL[0], dtype=np.int32)
    lps = np.full((len(rows), k), TOPK_SENTINEL[1], dtype=np.float32)
    for i, row in enumerate(rows):
        for j, (token, logprob) in enumerate(row or []):
            ids[i, j], lps[i, j] = token, logprob
    return ids, lps


def encode_sample_response(response: SampleResponse) -> bytes:
    message = pb.SampleResponse(prompt_cache_hit_tokens=response.prompt_cache_hit_tokens)
    for sequence in response.sequences:
        seq = message.sequences.add(stop_reason=0 if sequence.stop_reason == "stop" else 1,
                                    tokens=np.asarray(sequence.tokens, dtype="<i4").tobytes())
        if sequence.logprobs is not None:
            seq.logprobs = np.asarray(sequence.logprobs, dtype="<f4").tobytes()
        if sequence.topk_logprobs:
            k = max(len(row or []) for row in sequence.topk_logprobs)
            if k:
                _topk_to_proto(*_topk_table(sequence.topk_logprobs, k), seq.topk_sampled_logprobs)
    if response.prompt_logprobs is not None:
        message.prompt_logprobs = response.prompt_logprobs_np.astype("<f4").tobytes()
    if response.topk_prompt_logprobs:
        k = max(len(row or []) for row in response.topk_prompt_logprobs)
        if k:
            _topk_to_proto(*_topk_table(response.topk_prompt_logprobs, k), message.topk_prompt_logprobs)
    if response.target_prompt_logprobs is not None:
        _tensor_to_proto(response.target_prompt_logprobs, message.target_prompt_logprobs)
    if response.prompt_alt_tokens is not None:
        alt = response.prompt_alt_tokens
        message.prompt_alt_tokens.tokens.dtype = 3
        message.prompt_alt_tokens.tokens.dense = np.asarray(alt.tokens.to_numpy(), dtype="<i4").tobytes()
        message.prompt_alt_tokens.tokens.shape.extend(alt.tokens.shape or [len(alt.tokens.data)])
        _tensor_to_proto(alt.logprobs, message.prompt_alt_tokens.logprobs)
    return message.SerializeToString()


def decode_sample_response(body: bytes) -> SampleResponse:
    message = pb.SampleResponse()
    message.ParseFromString(body)
    sequences = []
    for seq in message.sequences:
        if seq.stop_reason not in (0, 1):
            raise ProtoDecodeError(f"unknown stop_reason {seq.stop_reason}")
        topk = _topk_from_proto(seq.topk_sampled_logprobs) if seq.HasField("topk_sampled_logprobs") else None
        sequences.append(SampledSequence(
            stop_reason="stop" if seq.stop_reason == 0 else "length",
            tokens=_array(seq.tokens, 3).tolist(),
            logprobs=_array(seq.logprobs, 1).tolist() if seq.HasField("logprobs") else None,
            topk_logprobs=topk_rows(*topk) if topk else None,
        ))
    prompt_logprobs = None
    if message.HasField("prompt_logprobs"):
        prompt_logprobs = [None if math.isnan(x) else x for x in _array(message.prompt_logprobs, 1).tolist()]
    topk = _topk_from_proto(message.topk_prompt_logprobs) if message.HasField("topk_prompt_logprobs") else None
    target = _float_tensor_from_proto(message.target_prompt_logprobs) \
        if message.HasField("target_prompt_logprobs") else None
    alt = None
    if message.HasField("prompt_alt_tokens"):
        alt = PromptAltTokens(tokens=_float_tensor_from_proto(message.prompt_alt_tokens.tokens, "int64"),
                              logprobs=_float_tensor_from_proto(message.prompt_alt_tokens.logprobs))
    return SampleResponse(sequences=sequences, prompt_logprobs=prompt_logprobs,
                          topk_prompt_logprobs=topk_rows(*topk) if topk else None,
                          prompt_cache_hit_tokens=message.prompt_cache_hit_tokens,
                          target_prompt_logprobs=target, prompt_alt_tokens=alt)


def _float_tensor_from_proto(message, dtype: str = "float32") -> TensorData:
    """A response tensor (any wire dtype code) as TensorData of the given dtype, dense or CSR."""
    np_dtype = np.int64 if dtype == "int64" else np.float32
    shape = list(message.shape)
    if message.WhichOneof("encoding") == "sparse_csr":
        csr = message.sparse_csr
        return TensorData(data=_array(csr.values, message.dtype).astype(np_dtype).tolist(), dtype=dtype,
                          shape=shape, sparse_crow_indices=_array(csr.crow_indices, 2).tolist(),
                          sparse_col_indices=_array(csr.col_indices, 2).tolist())
    values = _array(message.dense, message.dtype).astype(np_dtype)
    return TensorData(data=values.tolist(), dtype=dtype, shape=shape or [len(values)])
