"""Our protobuf codec against the official tinker SDK's own encoder and decoders (byte-level facts)."""

import math

import numpy as np
import pytest
import tinker
from tinker.proto import request_conv, response_conv

from tinkex import types


def _official_request(loss_fn_config=None, forward_only=False):
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints([5, 6, 7, 8]),
        loss_fn_inputs={
            "target_tokens": np.array([6, 7, 8, 9], dtype=np.int64),
            "weights": np.array([0.0, 1.0, -0.5, 2.0], dtype=np.float32),
        },
    )
    soft = tinker.Datum(
        model_input=tinker.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={
            "target_tokens": tinker.TensorData.from_numpy_sparse(np.array([[4, 0], [0, 0], [7, 8]]))
            if hasattr(tinker.TensorData, "from_numpy_sparse") else
            tinker.TensorData(data=[4, 7, 8], dtype="int64", shape=[3, 2],
                              sparse_crow_indices=[0, 1, 1, 3], sparse_col_indices=[0, 0, 1]),
            "weights": np.ones((3, 2), dtype=np.float32),
        },
    )
    request = tinker.types.ForwardBackwardRequest(
        forward_backward_input=tinker.types.ForwardBackwardInput(
            data=[datum, soft], loss_fn="ppo", loss_fn_config=loss_fn_config),
        model_id="s:train:0", seq_id=3)
    return request_conv.forward_backward_request_to_proto(request).SerializeToString()


def test_decode_official_forward_backward_request():
    body = _official_request({"clip_low_threshold": 0.8, "clip_high_threshold": 1.2, "mode": "x"})
    model_id, seq_id, fb_input, forward_only = types.decode_forward_backward_request(body)
    assert (model_id, seq_id, forward_only) == ("s:train:0", 3, False)
    assert fb_input.loss_fn == "ppo"
    assert fb_input.loss_fn_config == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2, "mode": "x"}
    first, soft = fb_input.data
    assert first.model_input.to_ints() == [5, 6, 7, 8]
    assert first.loss_fn_inputs["target_tokens"].to_numpy().tolist() == [6, 7, 8, 9]
    assert first.loss_fn_inputs["weights"].to_numpy().tolist() == [0.0, 1.0, -0.5, 2.0]
    assert soft.loss_fn_inputs["target_tokens"].to_numpy().tolist() == [[4, 0], [0, 0], [7, 8]]
    assert soft.loss_fn_inputs["weights"].to_numpy().shape == (3, 2)


def test_our_request_encoding_matches_official_bytes():
    ours = types.encode_forward_backward_request(
        "s:train:0", 3,
        [types.Datum(model_input=types.ModelInput.from_ints([5, 6, 7, 8]),
                     loss_fn_inputs={"target_tokens": np.array([6, 7, 8, 9]),
                                     "weights": np.array([0.0, 1.0, -0.5, 2.0], dtype=np.float32)})],
        "cross_entropy", None, forward_only=True)
    official = tinker.types.ForwardBackwardRequest(
        forward_backward_input=tinker.types.ForwardBackwardInput(
            data=[tinker.Datum(model_input=tinker.ModelInput.from_ints([5, 6, 7, 8]),
                               loss_fn_inputs={"target_tokens": np.array([6, 7, 8, 9]),
                                               "weights": np.array([0.0, 1.0, -0.5, 2.0], dtype=np.float32)})],
            loss_fn="cross_entropy"),
        model_id="s:train:0", seq_id=3)
    proto = request_conv.forward_backward_request_to_proto(official)
    proto.forward_only = True
    decoded_ours = types.decode_forward_backward_request(ours)
    decoded_official = types.decode_forward_backward_request(proto.SerializeToString())
    assert decoded_ours == decoded_official


def test_official_sdk_decodes_our_forward_backward_output():
    output = types.ForwardBackwardOutput(
        loss_fn_outputs=[
            {"logprobs": types.TensorData.from_numpy(np.array([-1.0, -2.5], dtype=np.float32))},
            {"logprobs": types.TensorData.from_numpy(np.array([[-0.1, -0.2], [-0.3, -0.4], [-0.5, -0.6]],
                                                               dtype=np.float32))},
        ],
        metrics={"loss:sum": 3.5, "ntokens:sum": 5.0},
    )
    official = response_conv.deserialize_forward_backward_output(types.encode_forward_backward_output(output))
    assert official.metrics == {"loss:sum": 3.5, "ntokens:sum": 5.0}
    assert official.loss_fn_outputs[0]["logprobs"].to_numpy().tolist() == [-1.0, -2.5]
    assert official.loss_fn_outputs[1]["logprobs"].to_numpy().shape == (3, 2)
    ours = types.decode_forward_backward_output(types.encode_forward_backward_output(output))
    assert ours == output


def test_official_sdk_decodes_our_sample_response():
    response = types.SampleResponse(
        sequences=[
            types.SampledSequence(stop_reason="stop", tokens=[4, 5, 6], logprobs=[-0.5, -1.0, -0.25],
                                  topk_logprobs=[[(4, -0.5), (9, -2.0)], [(5, -1.0)], None]),
            types.SampledSequence(stop_reason="length", tokens=[7], logprobs=[-3.0]),
        ],
        prompt_logprobs=[None, -1.5, -2.0],
        topk_prompt_logprobs=[None, [(3, -1.5), (2, -1.75)], [(8, -2.0), (1, -3.0)]],
    )
    body = types.encode_sample_response(response)
    official = response_conv.deserialize_sample_response(body)
    assert [s.stop_reason for s in official.sequences] == ["stop", "length"]
    assert official.sequences[0].tokens == [4, 5, 6]
    assert official.sequences[0].logprobs == [-0.5, -1.0, -0.25]
    assert official.sequences[0].topk_logprobs[2] is None
    assert official.sequences[0].topk_logprobs[1] == [(5, -1.0)]
    assert official.prompt_logprobs[0] is None and official.prompt_logprobs[1] == -1.5
    assert official.topk_prompt_logprobs[0] is None
    assert official.topk_prompt_logprobs[1] == [(3, -1.5), (2, -1.75)]
    ours = types.decode_sample_response(body)
    assert ours == response


def test_garbage_is_a_decode_error():
    with pytest.raises(types.ProtoDecodeError):
        types.decode_forward_backward_request(b"\xff\xff\xff\xff not a proto")
    with pytest.raises((types.ProtoDecodeError, ValueError)):
        types.decode_forward_backward_request(_official_request()[:-3])


def test_tensor_data_sparse_round_trip():
    dense = np.array([[0, 3, 0, 0], [0, 0, 0, 0], [5, 0, 0, 6]], dtype=np.int64)
    sparse = types.TensorData.from_numpy_sparse(dense)
    assert sparse.is_sparse
    assert np.array_equal(sparse.to_numpy(), dense)
    assert math.isclose(types.TensorData.from_numpy(np.array([1.5])).data[0], 1.5)
