"""Tenant-wide rate limiting, against a real server that answers 429 (test-only fault injection)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import tinkex
from tinkex import types
from tinkex.client import metrics, rate_limit
from tinkex.client.rate_limit import RateLimitConfig, TenantRateLimiter, normalize_base_url

from ..conftest import ALICE, BOB
from .conftest import MODEL, inject_fault

BACKOFF_S = 3.0
PROMPT = types.ModelInput.from_ints(list(range(3, 13)))  # 10 tokens: an estimated 100 bytes
PARAMS = types.SamplingParams(max_tokens=2, temperature=0.0)


@pytest.fixture(scope="module")
def throttling_server(tmp_path_factory, hf_home):
    from tinkex.server import EmbeddedServer

    server = EmbeddedServer(data_dir=tmp_path_factory.mktemp("ratelimit-server"),
                            api_keys={ALICE: "alice", BOB: "bob"}, fault_injection=True).start()
    yield server
    server.stop()


def _sampler(server, key: str) -> tinkex.SamplingClient:
    service = tinkex.ServiceClient(base_url=server.base_url, api_key=key)
    return service.create_sampling_client(base_model=MODEL).result(60)


def _timed_sample(sampler: tinkex.SamplingClient, out: dict, name: str) -> threading.Thread:
    def run() -> None:
        started = time.monotonic()
        sampler.sample(PROMPT, 1, PARAMS).result(60)
        out[name] = (started, time.monotonic())

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_429_seen_by_one_sampler_slows_every_sampler_of_that_tenant_only(throttling_server):
    server = throttling_server
    rate_limit.configure(server.base_url, ALICE, RateLimitConfig(backoff_s=BACKOFF_S, respect_retry_after=False))
    alice_1, alice_2, bob = _sampler(server, ALICE), _sampler(server, ALICE), _sampler(server, BOB)
    for sampler in (alice_1, alice_2, bob):
        sampler.sample(PROMPT, 1, PARAMS).result(60)  # warm up the model and the connections
    alice = rate_limit.limiter_for(server.base_url, ALICE)
    bob_limiter = rate_limit.limiter_for(server.base_url, BOB)
    assert alice is alice_1._rate_limiter() is alice_2._rate_limiter() and alice is not bob_limiter
    backoffs_before = metrics.REGISTRY.total("tinkex_sample_backoffs_total")

    inject_fault(server, "/api/v1/asample", 429, 1)
    times: dict[str, tuple[float, float]] = {}
    threads = [_timed_sample(alice_1, times, "alice_1")]
    deadline = time.monotonic() + 30
    while alice.backoff_remaining() == 0:  # alice_1 got the 429
        assert time.monotonic() < deadline, "the 429 never arrived"
        time.sleep(0.01)
    window_end = time.monotonic() + alice.backoff_remaining()
    assert alice.throttled() and alice.limits() == (10, 20.0)
    assert not bob_limiter.throttled() and bob_limiter.backoff_remaining() == 0
    threads += [_timed_sample(alice_2, times, "alice_2"), _timed_sample(bob, times, "bob")]
    for thread in threads:
        thread.join(60)

    # the other alice sampler (another ServiceClient, same key) waited out the window...
    assert times["alice_2"][1] >= window_end - 0.05
    assert times["alice_1"][1] >= window_end - 0.05
    # ... while bob, another key on the same server, went straight through
    assert times["bob"][1] < window_end
    assert bob_limiter.stats()["backoffs"] == 0 and bob_limiter.stats()["waited"] == 0
    assert alice.stats()["backoffs"] == 1 and alice.stats()["waited"] >= 1
    assert metrics.REGISTRY.total("tinkex_sample_backoffs_total") == backoffs_before + 1
    # the limits loosen again once the window and its tail are over
    rate_limit.configure(server.base_url, ALICE, throttle_tail_s=0.0)
    alice._throttled_until = 0.0
    assert not alice.throttled() and alice.limits() == (400, 1.0)


def test_budgets_tighten_while_throttled(throttling_server):
    server = throttling_server
    base = server.base_url
    rate_limit.configure(base, BOB, RateLimitConfig(backoff_s=0.3, respect_retry_after=False,
                                                    throttled_concurrency=2, throttle_tail_s=60.0))
    sampler = _sampler(server, BOB)
    limiter = sampler._rate_limiter()
    for future in [sampler.sample(PROMPT, 1, PARAMS) for _ in range(8)]:
        future.result(120)
    assert limiter.stats()["peak_in_flight"] >= 4  # unthrottled, they all go at once
    inject_fault(server, "/api/v1/asample", 429, 1)
    sampler.sample(PROMPT, 1, PARAMS).result(60)  # gets the 429, backs off, then goes through
    assert limiter.throttled() and limiter.stats()["backoffs"] == 1

    # throttled: at most 2 samples in flight, however many are asked for at once
    futures = [sampler.sample(PROMPT, 1, PARAMS) for _ in range(8)]
    for future in futures:
        future.result(120)
    stats = limiter.stats()
    assert stats["admitted_throttled"] >= 8 and stats["peak_in_flight_throttled"] <= 2

    # and each sample's bytes count 20 times: a budget of 3000 bytes fits one 100-byte prompt at a time
    rate_limit.configure(base, BOB, throttled_concurrency=10, byte_budget=3000)
    limiter._stats["peak_in_flight_throttled"] = 0
    futures = [sampler.sample(PROMPT, 1, PARAMS) for _ in range(6)]
    for future in futures:
        future.result(120)
    assert limiter.stats()["peak_in_flight_throttled"] == 1
    assert limiter.stats()["in_flight"] == 0 and limiter.stats()["bytes_in_flight"] == 0


def test_the_limiter_admits_waits_and_wakes():
    async def main() -> None:
        limiter = TenantRateLimiter("http://x", "k" * 64, RateLimitConfig(max_concurrency=2, byte_budget=1000))
        order: list[str] = []

        async def job(name: str, nbytes: int, hold: float) -> None:
            async with limiter.slot(nbytes):
                order.append(f"+{name}")
                await asyncio.sleep(hold)
                order.append(f"-{name}")

        await asyncio.gather(job("a", 600, 0.05), job("b", 600, 0.05), job("huge", 5000, 0.01))
        assert order.index("-a") < order.index("+b")  # 600 + 600 exceeds the budget
        assert "+huge" in order  # bigger than the whole budget, yet it runs (alone)
        # a backoff holds back new admissions until it ends
        limiter.backoff(0.2)
        started = time.monotonic()
        async with limiter.slot(10):
            assert time.monotonic() - started >= 0.19
        assert limiter.stats()["in_flight"] == 0

    asyncio.run(main())
    assert normalize_base_url("HTTP://Example.COM:80/path/") == "http://example.com/path"
    assert normalize_base_url("https://h:443") == "https://h"
    assert normalize_base_url("http://h:8000/") == "http://h:8000"
    with pytest.raises(ValueError):
        RateLimitConfig(throttled_concurrency=0)
