"""TrainingClient against a real `tinkex serve` process."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

import tinkex
from tinkex import types

from ..conftest import ALICE
from .conftest import MODEL, sft_datum

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Tinker trains LoRA adapters on a server.",
         "A second sentence for a small batch.", "Numbers: one two three four five six."]


@pytest.fixture(scope="module")
def batch(tokenizer) -> list[types.Datum]:
    return [sft_datum(tokenizer.encode(text)) for text in TEXTS]


def _seq_ids(proxy) -> list[tuple[str, int]]:
    """(path, seq_id) of each training request, in the order the server received them."""
    out = []
    for record in proxy.records:
        path = record.path
        if path == "/api/v1/forward_backward":
            out.append((path, types.decode_forward_backward_request(record.body)[1]))
        elif path in ("/api/v1/optim_step", "/api/v1/save_weights", "/api/v1/save_weights_for_sampler",
                      "/api/v1/load_weights"):
            out.append((path, record.json()["seq_id"]))
    return out


def _loss(trainer, batch) -> float:
    return trainer.forward(batch, "cross_entropy").result(60).metrics["loss:sum"]


def test_pipelined_training_loop(proxy, batch):
    client = tinkex.ServiceClient(base_url=proxy.base_url, api_key=ALICE)
    trainer = client.create_lora_training_client(MODEL, rank=8, seed=1).result(60)
    big = batch * 16  # enough work that a result cannot come back before the next submit
    losses = []
    for _ in range(4):
        fwd_bwd = trainer.forward_backward(big, "cross_entropy")
        optim = trainer.optim_step(types.AdamParams(learning_rate=5e-3))
        losses.append(fwd_bwd.result(60).metrics["loss:sum"])
        assert optim.result(60).metrics is not None
    assert losses[-1] < losses[0]
    client.close().result(30)

    # Requests reached the server in seq_id order 1, 2, 3, ... alternating forward_backward / optim_step.
    order = _seq_ids(proxy)
    assert [seq for _, seq in order] == list(range(1, 9))
    assert [path.rsplit("/", 1)[1] for path, _ in order] == ["forward_backward", "optim_step"] * 4
    # Pipelining: each optim_step was submitted before its forward_backward's result came back.
    fb_ids = [r.response_json()["request_id"] for r in proxy.records if r.path == "/api/v1/forward_backward"]
    optim_posts = [r for r in proxy.records if r.path == "/api/v1/optim_step"]
    for fb_id, optim_post in zip(fb_ids, optim_posts):
        result_poll = [r for r in proxy.records if r.path == "/api/v1/retrieve_future"
                       and r.json()["request_id"] == fb_id and r.headers.get("accept") == "application/x-protobuf"
                       and r.status == 200 and b"try_again" not in r.response_body][-1]
        assert optim_post.started < result_poll.finished
    # forward_backward bodies are protobuf; results were fetched as protobuf.
    fb_post = next(r for r in proxy.records if r.path == "/api/v1/forward_backward")
    assert fb_post.headers["content-type"] == "application/x-protobuf"
    assert fb_post.headers["x-sdk-method"] == "TrainingClient.forward_backward"


def test_forward_computes_without_training(trainer, batch):
    first = trainer.forward(batch, "cross_entropy").result(60)
    second = trainer.forward(batch, "cross_entropy").result(60)
    assert first.metrics["loss:sum"] == pytest.approx(second.metrics["loss:sum"], rel=1e-6)
    assert len(first.loss_fn_outputs) == len(batch)
    for datum, output in zip(batch, first.loss_fn_outputs):
        logprobs = output["logprobs"].to_numpy()
        assert logprobs.shape == datum.loss_fn_inputs["target_tokens"].to_numpy().shape
        assert (logprobs <= 0).all()
    total = sum(-(o["logprobs"].to_numpy() * d.loss_fn_inputs["weights"].to_numpy()).sum()
                for o, d in zip(first.loss_fn_outputs, batch))
    assert first.metrics["loss:sum"] == pytest.approx(total, rel=1e-4)


def test_batch_larger_than_one_chunk_is_split_and_merged(proxy, tokenizer):
    client = tinkex.ServiceClient(base_url=proxy.base_url, api_key=ALICE)
    trainer = client.create_lora_training_client(MODEL, rank=4, seed=2).result(60)
    rng = np.random.default_rng(0)
    data = [sft_datum(rng.integers(10, 1000, size=int(rng.integers(3, 7))).tolist()) for _ in range(1030)]
    result = trainer.forward_backward(data, "cross_entropy").result(120)
    posts = [r for r in proxy.records if r.path == "/api/v1/forward_backward"]
    assert len(posts) == 2  # 1024 + 6 datums
    decoded = [types.decode_forward_backward_request(r.body) for r in posts]
    assert [len(d[2].data) for d in decoded] == [1024, 6]
    assert [d[1] for d in decoded] == [1, 2]
    assert len(result.loss_fn_outputs) == 1030
    for datum, output in zip(data, result.loss_fn_outputs):  # outputs in the caller's order
        assert output["logprobs"].shape == [len(datum.loss_fn_inputs["target_tokens"].data)]
    expected = sum(-float(o["logprobs"].to_numpy().sum()) for o in result.loss_fn_outputs)
    assert result.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4)
    assert result.metrics["ntokens:sum"] == sum(len(d.loss_fn_inputs["target_tokens"].data) for d in data)
    # The next request takes the seq_id after both chunks.
    trainer.optim_step(types.AdamParams()).result(60)
    assert _seq_ids(proxy)[-1] == ("/api/v1/optim_step", 3)
    client.close().result(30)


def test_retry_reuses_its_seq_id_and_gets_the_same_result(proxy, service_client, batch):
    """The server accepts a forward_backward but the answer is lost: the SDK resends the same seq_id,
    the server recognises it, and training continues as if it had been sent once."""
    client = tinkex.ServiceClient(base_url=proxy.base_url, api_key=ALICE)
    trainer = client.create_lora_training_client(MODEL, rank=8, seed=7).result(60)
    control = service_client.create_lora_training_client(MODEL, rank=8, seed=7).result(60)

    proxy.lose_response("/api/v1/forward_backward", 1)
    result = trainer.forward_backward(batch, "cross_entropy").result(60)
    trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result(60)

    sent = [r for r in proxy.upstream_responses if r.path == "/api/v1/forward_backward"]
    assert len(sent) == 2
    assert sent[0].body == sent[1].body  # the same request, the same seq_id
    assert types.decode_forward_backward_request(sent[0].body)[1] == 1
    assert sent[0].response_json()["request_id"] == sent[1].response_json()["request_id"]

    expected = control.forward_backward(batch, "cross_entropy").result(60)
    control.optim_step(types.AdamParams(learning_rate=1e-2)).result(60)
    assert result.metrics["loss:sum"] == pytest.approx(expected.metrics["loss:sum"], rel=1e-5)
    # The gradient was applied once: both models took the same step.
    assert _loss(trainer, batch) == pytest.approx(_loss(control, batch), rel=1e-4)
    client.close().result(30)


@pytest.mark.parametrize("loss_fn, config", [
    ("importance_sampling", None),
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ("cispo", {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}),
    ("dro", {"beta": 0.1}),
])
def test_rl_losses(trainer, tokenizer, loss_fn, config):
    tokens = tokenizer.encode("Reward the good completions and punish the bad ones.")
    n = len(tokens) - 1
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "logprobs": [-2.0] * n,
                        "advantages": np.linspace(-1, 1, n).astype(np.float32)})
    result = trainer.forward_backward([datum], loss_fn, config).result(60)
    assert math.isfinite(result.metrics["loss:sum"])
    assert result.loss_fn_outputs[0]["logprobs"].shape == [n]


def test_cross_entropy_with_config_and_every_metric_has_a_reduction(trainer, batch):
    result = trainer.forward_backward(batch, "cross_entropy", {}).result(60)
    assert all(key.count(":") == 1 for key in result.metrics)


def test_unknown_loss_is_a_typed_4xx_without_retry_and_training_goes_on(proxy, batch):
    client = tinkex.ServiceClient(base_url=proxy.base_url, api_key=ALICE)
    trainer = client.create_lora_training_client(MODEL, rank=4).result(60)
    with pytest.raises(types.BadRequestError) as info:
        trainer.forward_backward(batch, "no_such_loss").result(60)
    assert "no_such_loss" in str(info.value)
    assert len([r for r in proxy.records if r.path == "/api/v1/forward_backward"]) == 1
    # The rejected request used seq_id 1; the next one (seq_id 2) must still run.
    assert trainer.forward_backward(batch, "cross_entropy").result(30).metrics["loss:sum"] > 0
    client.close().result(30)


def test_unknown_base_model_is_a_typed_4xx_without_retry(proxy):
    client = tinkex.ServiceClient(base_url=proxy.base_url, api_key=ALICE)
    with pytest.raises(types.BadRequestError, match="no/such-model"):
        client.create_lora_training_client("no/such-model").result(60)
    assert len([r for r in proxy.records if r.path == "/api/v1/create_model"]) == 1
    client.close().result(30)


def test_forward_backward_custom(trainer, batch):
    reference = trainer.forward(batch, "cross_entropy").result(60)
    ref_logprobs = [o["logprobs"].to_numpy() for o in reference.loss_fn_outputs]

    def loss_fn(data, logprobs):
        assert len(data) == len(batch) and all(lp.requires_grad for lp in logprobs)
        loss = sum(((lp + 1.0) ** 2).sum() for lp in logprobs)
        return loss, {"custom_metric:mean": 42.0}

    result = trainer.forward_backward_custom(batch, loss_fn).result(60)
    expected = sum(float(((lp + 1.0) ** 2).sum()) for lp in ref_logprobs)
    assert result.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4)
    # The server saw weights = -dLoss/dlogprobs = -2 (lp + 1): its CE is sum(-lp * w).
    surrogate = sum(float((lp * 2 * (lp + 1.0)).sum()) for lp in ref_logprobs)
    assert result.metrics["surrogate_loss:sum"] == pytest.approx(surrogate, rel=1e-3)
    assert result.metrics["custom_metric:mean"] == 42.0
    assert len(result.loss_fn_outputs) == len(batch)
    trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result(60)
    after = trainer.forward_backward_custom(batch, loss_fn).result(60)
    assert after.metrics["loss:sum"] < result.metrics["loss:sum"]


def test_custom_cross_entropy_matches_the_builtin_gradient(service_client, batch):
    """A custom loss equal to cross_entropy trains exactly like cross_entropy."""
    builtin = service_client.create_lora_training_client(MODEL, rank=8, seed=3).result(60)
    custom = service_client.create_lora_training_client(MODEL, rank=8, seed=3).result(60)

    def ce(data, logprobs):
        return sum(-(lp * d.loss_fn_inputs["weights"].to_torch()).sum() for d, lp in zip(data, logprobs)), {}

    a = builtin.forward_backward(batch, "cross_entropy")
    b = custom.forward_backward_custom(batch, ce)
    assert b.result(60).metrics["loss:sum"] == pytest.approx(a.result(60).metrics["loss:sum"], rel=1e-4)
    builtin.optim_step(types.AdamParams(learning_rate=1e-2)).result(60)
    custom.optim_step(types.AdamParams(learning_rate=1e-2)).result(60)
    assert _loss(custom, batch) == pytest.approx(_loss(builtin, batch), rel=1e-4)


def test_loss_handle_from_create_custom_loss(service_client, trainer, batch):
    def per_datum(logprobs, weights):
        loss = -(logprobs * weights).sum()
        return loss, {"custom/tokens:sum": weights.sum()}

    handle = service_client.create_custom_loss(per_datum, {"logprobs": 1, "weights": 1}).result(30)
    assert isinstance(handle, tinkex.LossHandle) and handle.input_names == ("weights",)
    assert handle.loss_id is None and len(handle.key) == 64
    reference = trainer.forward(batch, "cross_entropy").result(60)
    result = trainer.forward_backward_custom(batch, handle).result(60)
    assert result.metrics["loss:sum"] == pytest.approx(reference.metrics["loss:sum"], rel=1e-4)
    assert result.metrics["custom/tokens:sum"] == sum(len(d.loss_fn_inputs["weights"].data) for d in batch)
    with pytest.raises(ValueError):
        service_client.create_custom_loss(lambda x: (x.sum(), {}), {"x": 1}).result(30)


def test_failed_custom_loss_poisons_the_client(trainer, batch):
    def broken(data, logprobs):
        raise ZeroDivisionError("user bug")

    with pytest.raises(ZeroDivisionError):
        trainer.forward_backward_custom(batch, broken).result(60)
    with pytest.raises(RuntimeError, match="can no longer be used"):
        trainer.forward_backward(batch, "cross_entropy")


def test_checkpoints_save_and_load(service_client, trainer, batch):
    initial = _loss(trainer, batch)
    saved = trainer.save_state("before").result(60)
    assert saved.path == f"tinker://{trainer.model_id}/weights/before"
    for _ in range(2):
        trainer.forward_backward(batch, "cross_entropy")
        trainer.optim_step(types.AdamParams(learning_rate=1e-2))
    trained = _loss(trainer, batch)
    assert trained < initial
    after_steps = trainer.save_state("after").result(60).path

    trainer.load_state(saved.path).result(60)
    assert _loss(trainer, batch) == pytest.approx(initial, rel=1e-4)
    trainer.load_state_with_optimizer(after_steps).result(60)
    assert _loss(trainer, batch) == pytest.approx(trained, rel=1e-4)

    fresh = service_client.create_training_client_from_state(saved.path).result(60)
    assert fresh.model_id != trainer.model_id
    assert fresh.get_info().model_data.model_name == MODEL
    assert _loss(fresh, batch) == pytest.approx(initial, rel=1e-4)
    resumed = service_client.create_training_client_from_state_with_optimizer(after_steps).result(60)
    assert _loss(resumed, batch) == pytest.approx(trained, rel=1e-4)
    # Resumed optimizer state: one more identical step gives the same result on both.
    for client in (trainer, resumed):
        client.forward_backward(batch, "cross_entropy")
        client.optim_step(types.AdamParams(learning_rate=1e-2))
    assert _loss(resumed, batch) == pytest.approx(_loss(trainer, batch), rel=1e-4)


def test_sampler_weights_and_sampling_clients(service_client, trainer, batch, tokenizer):
    trainer.forward_backward(batch, "cross_entropy")
    trainer.optim_step(types.AdamParams(learning_rate=1e-2))
    saved = trainer.save_weights_for_sampler("s1").result(60)
    assert saved.path == f"tinker://{trainer.model_id}/sampler_weights/s1"

    prompt = types.ModelInput.from_ints(batch[0].model_input.to_ints())
    forward = trainer.forward([batch[0]], "cross_entropy").result(60).loss_fn_outputs[0]["logprobs"].to_numpy()
    for sampler in (service_client.create_sampling_client(model_path=saved.path).result(60),
                    trainer.create_sampling_client(saved.path).result(60),
                    trainer.save_weights_and_get_sampling_client().result(60)):
        assert sampler.get_base_model() == MODEL
        logprobs = sampler.compute_logprobs(
            types.ModelInput.from_ints(prompt.to_ints() + [batch[0].loss_fn_inputs["target_tokens"].data[-1]])
        ).result(60)
        assert logprobs[0] is None
        # The sampler serves the trained weights: its prompt logprobs are the trainer's target logprobs.
        np.testing.assert_allclose(np.array(logprobs[1:], dtype=np.float32), forward, atol=2e-3)


def test_info_tokenizer_and_console_url(trainer):
    info = trainer.get_info()
    assert info.model_id == trainer.model_id and info.model_data.model_name == MODEL
    assert info.lora_rank == 8 and info.is_lora
    tokenizer = trainer.get_tokenizer()
    assert tokenizer is trainer.get_tokenizer()  # cached
    assert tokenizer.decode(tokenizer.encode("hello world")) == "hello world"
    assert trainer.model_id in trainer.get_console_url()


def test_async_forms(service_client, batch):
    async def main():
        trainer = await service_client.create_lora_training_client_async(MODEL, rank=4)
        fwd_bwd = await trainer.forward_backward_async(batch, "cross_entropy")
        optim = await trainer.optim_step_async(types.AdamParams(learning_rate=1e-3))
        results = await asyncio.gather(fwd_bwd, optim)
        saved = await (await trainer.save_state_async("a"))
        sampler = await trainer.save_weights_and_get_sampling_client_async()
        info = await trainer.get_info_async()
        return results, saved, sampler, info

    (fb, optim), saved, sampler, info = asyncio.run(main())
    assert fb.metrics["loss:sum"] > 0 and optim.metrics is not None
    assert saved.path.endswith("/weights/a") and isinstance(sampler, tinkex.SamplingClient)
    assert info.model_data.model_name == MODEL


def test_backcompat_future_forwards_client_methods(service_client, batch):
    future = service_client.create_lora_training_client(MODEL, rank=4)
    assert isinstance(future, tinkex.APIFuture)
    # Old code used the return value as the client itself.
    assert future.forward(batch, "cross_entropy").result(60).metrics["loss:sum"] > 0
    assert future.get_info().model_id == future.result().model_id


def test_optim_step_argument_checks(trainer):
    with pytest.raises(TypeError):
        trainer.optim_step()
    with pytest.raises(TypeError):
        trainer.optim_step(types.AdamParams(), adam_params=types.AdamParams())
    assert trainer.optim_step(adam_params=types.AdamParams(learning_rate=1e-4)).result(60).metrics is not None
