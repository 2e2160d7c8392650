"""Engine workers behind the server: a local Ray head on loopback with two CPU engine actors runs a
training loop and sampling through the official `tinker` SDK with the same results as the
in-process engine; `tinkex serve --workers 2` (local worker processes) and `tinkex serve --ray-address`
(with a PostgreSQL store) run the core loop."""

from __future__ import annotations

import shutil
import tempfile

import numpy as np
import openai
import pytest
import tinker
import torch
from tinker import types

from tinkex.server import EmbeddedServer

from ..conftest import ALICE, fresh_database, start_server
from .test_older_sdk import run_core_loop

ray = pytest.importorskip("ray", reason="Ray workers need the ray extra: pip install 'tinkex[ray]'")

MODEL = "tinkex/tiny-qwen3"


@pytest.fixture(scope="module")
def ray_head(hf_home):
    """A private Ray head on loopback with two CPUs: room for exactly two one-CPU engine actors."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths live under it
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, _node_ip_address="127.0.0.1",
             _temp_dir=temp_dir, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def ready(client_or_future):
    return client_or_future.result() if hasattr(client_or_future, "result") else client_or_future


def training_and_sampling(base_url: str) -> dict:
    """Two seeded LoRA runs trained side by side, a resume from saved state, and samples (greedy,
    seeded, base model) with prompt logprobs: everything a run observes."""
    client = tinker.ServiceClient(base_url=base_url, api_key=ALICE)
    trainers = [ready(client.create_lora_training_client(base_model=MODEL, rank=8, seed=seed)) for seed in (0, 1)]
    tokenizer = trainers[0].get_tokenizer()
    batch = []
    for text in ["cat says meow", "dog says woof", "cow says moo"]:
        tokens = tokenizer.encode(text) + [tokenizer.eos_token_id]
        batch.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                                 loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64),
                                                 "weights": np.ones(len(tokens) - 1, dtype=np.float32)}))
    losses = []
    for _ in range(6):
        steps = [(t.forward_backward(batch, "cross_entropy"), t.optim_step(types.AdamParams(learning_rate=5e-3)))
                 for t in trainers]
        losses.append([fb.result().metrics["loss:sum"] for fb, _ in steps])
        for _, optim in steps:
            optim.result()
    state = trainers[1].save_state("ray-loop").result().path
    resumed = ready(client.create_training_client_from_state(state))
    resumed_loss = resumed.forward(batch, "cross_entropy").result().metrics["loss:sum"]
    final_loss = trainers[1].forward(batch, "cross_entropy").result().metrics["loss:sum"]

    prompt = types.ModelInput.from_ints(tokenizer.encode("cat says"))
    sampler = ready(trainers[0].save_weights_and_get_sampling_client())
    greedy = sampler.sample(prompt=prompt, num_samples=2,
                            sampling_params=types.SamplingParams(max_tokens=5, temperature=0.0)).result()
    seeded = sampler.sample(prompt=prompt, num_samples=2,
                            sampling_params=types.SamplingParams(max_tokens=5, temperature=1.0, seed=7)).result()
    base = ready(client.create_sampling_client(base_model=MODEL)).sample(
        prompt=prompt, num_samples=1, sampling_params=types.SamplingParams(max_tokens=5, seed=3)).result()
    prompt_logprobs = sampler.compute_logprobs(prompt).result()
    # Streaming: the decoded tokens cross from the worker to the server step by step.
    openai_client = openai.OpenAI(base_url=base_url + "/v1", api_key=ALICE, max_retries=0)
    stream = openai_client.completions.create(model=MODEL, prompt="cat says", max_tokens=6, temperature=0,
                                              stream=True)
    chunks = [chunk.choices[0].text for chunk in stream if chunk.choices]
    return {"losses": losses, "resumed_loss": resumed_loss, "final_loss": final_loss,
            "greedy": [s.tokens for s in greedy.sequences], "seeded": [s.tokens for s in seeded.sequences],
            "seeded_logprobs": [s.logprobs for s in seeded.sequences], "base": [s.tokens for s in base.sequences],
            "prompt_logprobs": prompt_logprobs[1:], "stream": chunks}


def test_ray_workers_match_the_in_process_engine(ray_head, tmp_path, one_thread):
    reference = EmbeddedServer(tmp_path / "in-process", api_keys={ALICE: "alice"}, torch_threads=1).start()
    try:
        expected = training_and_sampling(reference.base_url)
    finally:
        reference.stop()

    server = EmbeddedServer(tmp_path / "ray", api_keys={ALICE: "alice"}, torch_threads=1,
                            ray_address=ray_head, workers=2).start()
    try:
        got = training_and_sampling(server.base_url)
        pool = server.runtime.engine
        assert [w.name for w in pool.workers] == ["ray-worker-0", "ray-worker-1"]
        assert ray.available_resources().get("CPU", 0) == 0  # both actors hold their CPU
        # The two runs trained on different actors; the snapshot sampler and the resumed run were
        # loaded, from the shared data directory, by whichever actor held fewer adapters.
        per_worker = {name: s["adapters"]["total"] for name, s in pool.stats()["workers"].items()}
        assert per_worker == {"ray-worker-0": 2, "ray-worker-1": 2}, pool.placement()
    finally:
        server.stop()

    np.testing.assert_allclose(got["losses"], expected["losses"], rtol=1e-5)
    assert expected["losses"][-1][0] < 0.85 * expected["losses"][0][0]  # it trains
    assert got["resumed_loss"] == pytest.approx(expected["resumed_loss"], rel=1e-5)
    assert got["resumed_loss"] == pytest.approx(got["final_loss"], rel=1e-5)
    assert got["greedy"] == expected["greedy"] and got["greedy"][0] == got["greedy"][1]
    assert got["seeded"] == expected["seeded"] and got["base"] == expected["base"]
    np.testing.assert_allclose(got["seeded_logprobs"], expected["seeded_logprobs"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["prompt_logprobs"], expected["prompt_logprobs"], rtol=1e-4, atol=1e-5)
    assert got["stream"] == expected["stream"] and sum(1 for piece in got["stream"] if piece) >= 2


def test_serve_with_local_worker_processes_runs_the_core_loop(tmp_path):
    """The `tinkex serve --workers` path: settings from the command line, two worker processes."""
    server = start_server(tmp_path, "--workers", "2")
    try:
        seen = run_core_loop(server.base_url, None)  # asserts that it trains, samples, resumes
        assert seen["version"] == tinker.__version__
    finally:
        server.stop()


def test_serve_joins_a_ray_cluster_by_address(ray_head, postgres_url, tmp_path):
    """The cluster deployment in small: `tinkex serve --ray-address HOST:PORT --database-url
    postgresql+psycopg://...`, a second Ray driver that places its actors on the head."""
    database = fresh_database(postgres_url, "tinkex_ray")
    server = start_server(tmp_path, "--ray-address", ray_head, "--workers", "2", "--database-url", database)
    try:
        run_core_loop(server.base_url, None)
        assert ray.available_resources().get("CPU", 0) == 0  # its two actors hold the head's two CPUs
    finally:
        server.stop()
