"""The lean forward (decode.LeanDecoder: decode steps over kvcache.DenseCache, and whole sequences for
training) against the Hugging Face forward, and the batch-wide seeded draws (draws.py) against what
they promise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tinkex.engine import BUILTIN_MODEL, Engine, LoraSpec, decode, draws, kvcache, lora

from .conftest import M, randomize_b

SMALL = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)


def _save_model(directory, engine: Engine, config) -> str:
    """A small random model of this config, with the built-in model's tokenizer, saved to `directory`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(engine._bases[M].directory).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def lean_engine(tmp_path_factory, engine_hf_home):
    """An engine serving the built-in Qwen3, a Llama and a Qwen2 (biased q/k/v projections)."""
    from transformers import LlamaConfig, Qwen2Config

    root = tmp_path_factory.mktemp("lean-models")
    probe = Engine(hf_home=engine_hf_home)
    llama = _save_model(root / "llama", probe, LlamaConfig(**SMALL, tie_word_embeddings=True))
    qwen2 = _save_model(root / "qwen2", probe, Qwen2Config(**SMALL, tie_word_embeddings=False))
    return Engine([M, llama, qwen2], hf_home=engine_hf_home), [M, llama, qwen2]


def _with_adapters(engine: Engine, name: str, prefix: str = "lean") -> list[str]:
    ids = []
    for i, spec in enumerate([LoraSpec(rank=4, seed=1), LoraSpec(rank=2, seed=2, train_mlp=False, train_unembed=True)]):
        adapter_id = f"{prefix}-{name}-{i}"
        if not engine.has_adapter(adapter_id):
            engine.create_adapter(adapter_id, name, spec)
            randomize_b(engine, adapter_id, seed=20 + i, std=0.1)
        ids.append(adapter_id)
    return ids


def _reference_logits(base, owner, tokens) -> torch.Tensor:
    """The plain Hugging Face forward (no cache) of one sequence under one adapter: last logits."""
    base.routing.set(lora.groups_from_owners([owner]))
    try:
        return base.model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0, -1]
    finally:
        base.routing.clear()


def _prefill(cache, prompts, owners):
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for r, prompt in enumerate(prompts):
        ids[r, width - len(prompt):] = torch.tensor(prompt)
        mask[r, width - len(prompt):] = 1
    last = torch.arange(1, len(prompts) + 1) * width - 1
    return cache.prefill(ids, mask, owners, head=(last, lora.groups_from_owners(owners)))


@pytest.mark.parametrize("model", [0, 1, 2], ids=["qwen3", "llama", "qwen2"])
@torch.inference_mode()
def test_lean_decode_gives_the_hugging_face_logits(lean_engine, model):
    """Rows of two adapters and the bare model, prompts of different lengths, rows joining a running
    cache, leaving it and being repeated: every decode step's logits are the full forward's."""
    engine, names = lean_engine
    name = names[model]
    base = engine._bases[name]
    a, b = _with_adapters(engine, name)
    assert decode.for_model(base) is not None
    rng = np.random.default_rng(model)
    prompts = [rng.integers(3, 2000, size=n).tolist() for n in (5, 11, 2, 8)]
    owners = [a, a, b, None]
    cache = kvcache.new_cache(base)
    assert isinstance(cache, kvcache.DenseCache)
    logits = _prefill(cache, prompts, owners)
    sequences = [list(p) for p in prompts]
    for step in range(6):
        for r, seq in enumerate(sequences):
            torch.testing.assert_close(logits[r], _reference_logits(base, owners[r], seq), atol=2e-5, rtol=1e-5)
        if step == 2:  # a new request joins (prefilled alone, appended) ...
            fresh = kvcache.new_cache(base)
            joined = [rng.integers(3, 2000, size=14).tolist()]
            new_logits = _prefill(fresh, joined, [b])
            fresh.select([0, 0])  # ... with two samples
            cache.extend(fresh)
            sequences += [list(joined[0]), list(joined[0])]
            owners += [b, b]
            logits = torch.cat([logits, new_logits, new_logits])
        if step == 4:  # rows leave, and the rest are regrouped by adapter
            keep = [0, 4, 5, 3]
            cache.select(keep)
            sequences, owners, logits = [sequences[r] for r in keep], [owners[r] for r in keep], logits[keep]
        tokens = torch.tensor(rng.integers(3, 2000, size=len(sequences)))
        for seq, token in zip(sequences, tokens.tolist()):
            seq.append(token)
        logits = cache.decode(tokens, owners)


@pytest.mark.parametrize("model", [0, 1, 2], ids=["qwen3", "llama", "qwen2"])
def test_lean_training_forward_gives_the_hugging_face_logits_and_gradients(lean_engine, model):
    """Right-padded rows of two adapters and the bare model through the lean sequence forward: every
    real position's logits, and the adapters' gradients, are those of the Hugging Face forward."""
    engine, names = lean_engine
    name = names[model]
    base = engine._bases[name]
    owners_ids = _with_adapters(engine, name, prefix="lean-train")  # trainable: made outside inference mode
    lean = decode.for_model(base)
    rng = np.random.default_rng(10 + model)
    lengths = [6, 13, 9, 4]
    owners = [owners_ids[0], owners_ids[0], owners_ids[1], None]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.tensor(rng.integers(3, 2000, size=n))
    params = [p for a in owners_ids for pair in engine._adapters[a].weights.values() for p in pair]

    def run(forward):
        base.routing.set(lora.groups_from_owners(owners))
        try:
            logits = forward(ids)
        finally:
            base.routing.clear()
        real = torch.cat([logits[r, :n] for r, n in enumerate(lengths)])
        grads = torch.autograd.grad(real.log_softmax(-1)[:, 7].sum(), params, allow_unused=True)
        return real.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    ours, our_grads = run(lean.forward_sequences)
    theirs, their_grads = run(lambda x: base.model(input_ids=x, use_cache=False).logits)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)
    for mine, reference in zip(our_grads, their_grads):
        torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-4)
    assert any(g.abs().max() > 0 for g in our_grads)


def test_capacity_grows_and_keeps_what_was_cached(lean_engine):
    """Decoding past the preallocated length doubles the buffers; nothing cached is lost."""
    engine, names = lean_engine
    base = engine._bases[names[1]]
    with torch.inference_mode():
        cache = kvcache.new_cache(base)
        seq = [7, 8, 9]
        logits = _prefill(cache, [seq], [None])
        capacities = {cache.keys.shape[3]}
        for _ in range(20):
            token = int(logits[0].argmax())
            seq.append(token)
            logits = cache.decode(torch.tensor([token]), [None])
            capacities.add(cache.keys.shape[3])
        torch.testing.assert_close(logits[0], _reference_logits(base, None, seq), atol=2e-5, rtol=1e-5)
    assert len(capacities) > 2 and max(capacities) < 2 * len(seq)


def test_other_architectures_decode_through_hugging_face(tmp_path, engine_hf_home):
    """A model without a lean decoder (here GPT-2) still samples, through the general RowCache."""
    from transformers import GPT2Config

    probe = Engine(hf_home=engine_hf_home)
    path = _save_model(tmp_path / "gpt2", probe, GPT2Config(vocab_size=2048, n_embd=32, n_layer=1, n_head=2))
    engine = Engine([path], hf_home=engine_hf_home)
    from tinkex.engine import SampleJob

    (result,) = engine.sample([SampleJob(path, None, [5, 6, 7], max_tokens=5, seed=1, stop_token_ids=[])])
    assert len(result.sequences[0].tokens) == 5
    assert isinstance(kvcache.new_cache(engine._bases[path]), kvcache.RowCache)


# --- draws ------------------------------------------------------------------------------------


def test_hash_is_the_reference_lowbias32():
    """The vectorised uint32 version wraps and shifts exactly as the one-number reference does."""
    values = np.random.default_rng(0).integers(0, 2**32, size=3000, dtype=np.uint64)
    got = draws.mix32(values.astype(np.uint32)).tolist()
    assert got == [draws.mix32_int(int(v)) for v in values]


def test_uniforms_are_uniform_and_depend_only_on_key_and_step():
    keys = np.array([draws.row_key(seed, s) for seed in range(50) for s in range(40)], dtype=np.uint32)
    steps = np.arange(len(keys)) % 7
    u = torch.from_numpy(draws.uniforms(keys, steps))
    assert 0 < u.min() and u.max() < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert len(set(u.tolist())) > len(u) - 5  # no two rows (seed, sample, step) alike
    # One row alone, or beside others in another order: the same number.
    assert float(draws.uniforms(keys[[5]], steps[[5]])[0]) == float(u[5])
    assert float(draws.uniforms(keys[::-1], steps[::-1])[-6]) == float(u[5])
    # Consecutive steps of one row are unrelated.
    walk = torch.from_numpy(draws.uniforms(keys[:1].repeat(4000), np.arange(4000)))
    assert abs(float(torch.corrcoef(torch.stack([walk[:-1], walk[1:]]))[0, 1])) < 0.05
    assert draws.row_key(2**64 - 1, 0) != draws.row_key(2**63 - 1, 0)  # the high bit of the seed counts


def test_draws_follow_the_shaped_distribution():
    """Many rows of one distribution (each its own key): token frequencies match softmax(logits / T)
    within sampling error, top-k / top-p leave only what they should, temperature 0 is the argmax."""
    rows, vocab = 20000, 6
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0]).repeat(rows, 1)
    keys = np.array([draws.row_key(99, s) for s in range(rows)], dtype=np.uint32)
    steps = np.zeros(rows, dtype=np.int64)

    def frequencies(temperature=1.0, top_k=vocab, top_p=1.0):
        params = draws.DrawParams.of([temperature] * rows, [top_k] * rows, [top_p] * rows, keys, steps, vocab)
        tokens, _ = draws.choose(logits, params)
        return torch.bincount(tokens, minlength=vocab).double() / rows

    for temperature in (1.0, 0.5):
        expected = (logits[0] / temperature).softmax(-1).double()
        assert float((frequencies(temperature) - expected).abs().max()) < 4 * float((expected / rows).sqrt().max())
    top2 = frequencies(top_k=2)
    assert float(top2[2:].sum()) == 0 and abs(float(top2[0]) - float(logits[0, :2].softmax(-1)[0])) < 0.02
    probs = logits[0].softmax(-1)  # 0.61, 0.22, 0.14, ...: top_p 0.7 keeps the first two
    top_p = frequencies(top_p=0.7)
    assert float(top_p[2:].sum()) == 0 and float(top_p[1]) > 0.2
    assert float(probs[:2].sum()) > 0.7 > float(probs[0])
    greedy = frequencies(temperature=0.0)
    assert float(greedy[0]) == 1.0


def test_mixed_rows_draw_as_if_alone():
    """Rows with different parameters in one call get what each gets alone."""
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    temperature, top_k, top_p = [1.0, 0.0, 0.7, 1.3, 1.0], [300, 300, 20, 300, 5], [1.0, 1.0, 0.9, 0.5, 1.0]
    keys = [draws.row_key(i, 0) for i in range(5)]
    steps = [0, 3, 7, 1, 2]
    together, _ = draws.choose(logits, draws.DrawParams.of(temperature, top_k, top_p, keys, steps, 300))
    for r in range(5):
        alone, _ = draws.choose(logits[[r]], draws.DrawParams.of([temperature[r]], [top_k[r]], [top_p[r]], [keys[r]],
                                                               [steps[r]], 300))
        assert int(alone[0]) == int(together[r])
    assert int(together[1]) == int(logits[1].argmax())


def test_two_level_search_is_the_inverse_cdf():
    """The blocked search picks what one cumulative sum over the whole vocabulary picks (up to ties in
    the last bit), never a zero-probability token (masked, or the padding of a vocabulary that is not
    a whole number of blocks), even at the extremes of u."""
    gen = torch.Generator().manual_seed(0)
    rows, vocab = 4000, 1000  # 1000 tokens: eight blocks, the last one padded
    logits = torch.randn(rows, vocab, generator=gen) * 3
    logits[::2, 50:] = -math.inf  # half the rows keep 50 tokens, as a top-k would
    logits[1::4, :] = -math.inf
    logits[1::4, [3, 500, 999]] = 0.0  # three tokens, in three blocks
    probs = logits.softmax(-1)
    u = torch.rand(rows, generator=gen).clamp(2**-25, 1 - 2**-25)
    u[:8] = torch.tensor([2**-25, 1 - 2**-25] * 4)
    cumulative = probs.cumsum(-1)
    reference = torch.searchsorted(cumulative, (u * cumulative[:, -1])[:, None]).squeeze(1)
    got = draws._inverse_cdf(probs, u)
    assert bool((probs.gather(1, got[:, None]) > 0).all())
    assert float((got != reference).float().mean()) < 1e-3
    assert set(got[1::4].tolist()) == {3, 500, 999}


def test_draws_give_logprobs_when_they_come_free():
    """Rows all drawn from the unmodified distribution: the draw's log-probabilities are log_softmax's
    at those tokens; any other shaping: none (the sampler computes them)."""
    logits = torch.randn(32, 2048, generator=torch.Generator().manual_seed(1)) * 4
    keys, steps = [draws.row_key(7, s) for s in range(32)], list(range(32))
    tokens, logprobs = draws.choose(logits, draws.DrawParams.of([1.0] * 32, [-1] * 32, [1.0] * 32, keys, steps, 2048))
    want = logits.double().log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
    assert float((logprobs.double() - want).abs().max()) < 2e-6
    for shaped in (draws.DrawParams.of([0.7] * 32, [-1] * 32, [1.0] * 32, keys, steps, 2048),
                   draws.DrawParams.of([1.0] * 32, [40] * 32, [1.0] * 32, keys, steps, 2048)):
        assert draws.choose(logits, shaped)[1] is None


@pytest.mark.parametrize("name", decode.RMS_NORMS)
def test_fused_rms_norm_is_the_models_own(name):
    """The lean forward's one-op RMS norm gives exactly what each architecture's norm module gives,
    values and gradients, in float32 (and hands other dtypes to the module)."""
    import importlib

    family = name.removesuffix("RMSNorm").lower()
    norm = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 7, 48, generator=torch.Generator().manual_seed(1), requires_grad=True)
    want = norm(x)
    (grad_want,) = torch.autograd.grad(want.square().sum(), x)
    got = decode._rms_norm(norm, x)
    (grad_got,) = torch.autograd.grad(got.square().sum(), x)
    assert torch.equal(got, want) and torch.equal(grad_got, grad_want)
    half = x.detach().bfloat16()
    assert torch.equal(decode._rms_norm(norm.bfloat16(), half), norm(half))


def test_a_models_lean_decoder_is_worked_out_once_and_freed_with_it(engine_hf_home):
    """Every training step and decode batch asks for the lean decoder: the same one comes back, and
    keeping it does not keep an engine's model alive."""
    import gc
    import weakref

    engine = Engine(hf_home=engine_hf_home)
    base = engine._bases[BUILTIN_MODEL]
    first = decode.for_model(base)
    assert first is not None and decode.for_model(base) is first
    model = weakref.ref(base.model)
    del engine, base, first
    gc.collect()
    assert model() is None
