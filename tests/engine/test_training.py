"""forward_backward: every loss against an independent reference (value, logprobs, gradient), the
multi-adapter batch against each adapter alone, LoRA targets and seeds, accumulation, a fine-tune."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinkex.engine import (
    LORA_ALPHA,
    AdamHyper,
    EngineError,
    ForwardBackwardJob,
    LoraSpec,
    SampleJob,
    training,
)

from .conftest import (
    M,
    V,
    assert_close_scaled,
    clear_grads,
    datum,
    full_logprobs,
    grads,
    leaf_copies,
    random_datum,
    randomize_b,
    reference_logprobs,
)

# --- reference losses, written from the definitions (plain torch, per datum) -------------------

def ref_cross_entropy(lp, inputs, config):
    return -(lp * inputs["weights"]).sum()


def ref_importance_sampling(lp, inputs, config):
    return -(torch.exp(lp - inputs["logprobs"]) * inputs["advantages"]).sum()


def ref_ppo(lp, inputs, config):
    ratio = torch.exp(lp - inputs["logprobs"])
    clipped = torch.clamp(ratio, config.get("clip_low_threshold", 0.8), config.get("clip_high_threshold", 1.2))
    return -torch.min(ratio * inputs["advantages"], clipped * inputs["advantages"]).sum()


def ref_cispo(lp, inputs, config):
    ratio = torch.exp(lp - inputs["logprobs"]).detach()
    clipped = torch.clamp(ratio, config.get("clip_low_threshold", 0.8), config.get("clip_high_threshold", 1.2))
    return -(clipped * lp * inputs["advantages"]).sum()


def ref_dro(lp, inputs, config):
    beta = config.get("beta", 0.05)
    return -(lp * inputs["advantages"] - beta / 2 * (lp - inputs["logprobs"]) ** 2).sum()


def ref_gspo(lp, inputs, config):
    """One datum: s = exp(mean log-ratio over the masked tokens), carried by every token with the
    gradient of that token's own logprob: r_t = sg(s) * p_t / sg(p_t)."""
    mask = inputs.get("sequence_ratio_mask", torch.ones_like(lp)) != 0
    s = torch.exp((lp - inputs["logprobs"])[mask].mean()) if mask.any() else torch.ones((), dtype=lp.dtype)
    r = s.detach() * torch.exp(lp - lp.detach())
    clipped = torch.clamp(r, config.get("clip_low_threshold", 1 - 3e-4), config.get("clip_high_threshold", 1 + 4e-4))
    return -torch.min(r * inputs["advantages"], clipped * inputs["advantages"]).sum()


def ref_stable_reinforce(lp, inputs, config):
    ratio = torch.exp(lp - inputs["logprobs"])
    weight = torch.clamp(ratio.detach(), max=config.get("clip_high_threshold", 2.0))
    kl = (ratio - 1) - (lp - inputs["logprobs"])
    return -(weight * lp * inputs["advantages"]).sum() + config.get("kl_coeff", 0.0) * kl.sum()


CASES = {
    "cross_entropy": (ref_cross_entropy, {}),
    "importance_sampling": (ref_importance_sampling, {}),
    "ppo": (ref_ppo, {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    "ppo-defaults": (ref_ppo, {}),
    "cispo": (ref_cispo, {}),
    "dro": (ref_dro, {"beta": 0.3}),
    "gspo": (ref_gspo, {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    "gspo-mask": (ref_gspo, {"clip_low_threshold": 0.97, "clip_high_threshold": 1.03}),
    "gspo-defaults": (ref_gspo, {}),
    "stable_reinforce": (ref_stable_reinforce, {"clip_high_threshold": 1.1, "kl_coeff": 0.5}),
    "stable_reinforce-defaults": (ref_stable_reinforce, {}),
}


GATED = ("cross_entropy", "importance_sampling", "ppo", "cispo", "gspo", "stable_reinforce-defaults")  # with a
# gradient gate (stable_reinforce without its KL penalty); `stable_reinforce-prompt` has one and runs ungated


def _make_data(rng, ref_model, leaves, scale, loss_fn, soft=False, mask=False, prompt=False):
    """Three datums for `loss_fn`; with `prompt`, the gate input (weights or advantages) is zero over
    the leading two thirds of each datum, as for chat or RL data whose prompt carries no loss."""
    data = []
    for i, length in enumerate((5, 11, 3)):
        d = random_datum(rng, length)
        if soft:  # 2-D soft targets: K candidates per position with float weights
            d.inputs["target_tokens"] = rng.integers(0, V, (length, 3))
            d.inputs["weights"] = rng.normal(size=(length, 3)).astype(np.float32)
        elif loss_fn == "cross_entropy":
            d.inputs["weights"] = rng.normal(size=length).astype(np.float32)  # negative weights included
        else:
            with torch.no_grad():
                lp = reference_logprobs(ref_model, leaves, scale, d.tokens, d.inputs["target_tokens"]).numpy()
            # sampler logprobs near the learner's, so some ratios fall outside the clip range
            d.inputs["logprobs"] = (lp + rng.normal(0, 0.3, length)).astype(np.float32)
            d.inputs["advantages"] = rng.normal(size=length).astype(np.float32)
            if mask:  # some tokens out of the sequence ratio, and a datum with none in it (s = 1)
                d.inputs["sequence_ratio_mask"] = (rng.random(length) < 0.6).astype(np.float32) * (i != 2)
        if prompt:
            d.inputs["weights" if loss_fn == "cross_entropy" else "advantages"][: 2 * length // 3] = 0
        data.append(d)
    return data


@pytest.mark.parametrize("case", [*CASES, "cross_entropy-2d", *(f"{loss}-prompt" for loss in GATED),
                                  "stable_reinforce-prompt"])
def test_loss_matches_reference(engine, ref_model, new_id, case, monkeypatch):
    """`-prompt` cases: most tokens carry no gradient, so the unembedding's backward runs over the
    others only (training._gated_target_logprobs) -- and must still give the reference's gradient.
    stable_reinforce with a KL penalty pulls on every token: it must not take that path."""
    loss_fn = case.split("-")[0]
    reference, config = CASES.get(case.removesuffix("-prompt"), CASES[loss_fn])
    aid = new_id()
    engine.create_adapter(aid, M, LoraSpec(rank=4, seed=11))
    randomize_b(engine, aid, seed=5)
    scale = LORA_ALPHA / 4
    leaves = leaf_copies(engine, aid)
    data = _make_data(np.random.default_rng(len(case)), ref_model, leaves, scale, loss_fn, soft=case.endswith("2d"),
                      mask=case.endswith("mask"), prompt=case.endswith("prompt"))
    gated = []
    split = training._gated_target_logprobs
    monkeypatch.setattr(training, "_gated_target_logprobs", lambda *a, **k: gated.append(1) or split(*a, **k))

    (result,) = engine.forward_backward([ForwardBackwardJob(aid, data, loss_fn, loss_fn_config=config)])
    assert bool(gated) == (case.endswith("prompt") and case != "stable_reinforce-prompt")

    ref_total = 0
    for d, out in zip(data, result.outputs):
        lp = reference_logprobs(ref_model, leaves, scale, d.tokens, d.inputs["target_tokens"])
        assert out["logprobs"].dtype == np.float32 and out["logprobs"].shape == d.inputs["target_tokens"].shape
        np.testing.assert_allclose(out["logprobs"], lp.detach().numpy(), rtol=1e-5, atol=1e-5)
        inputs = {k: torch.from_numpy(v).double() for k, v in d.inputs.items() if k != "target_tokens"}
        ref_total = ref_total + reference(lp, inputs, config)
    ref_total.backward()
    assert result.metrics["loss:sum"] == pytest.approx(ref_total.item(), rel=1e-5, abs=1e-5)
    assert all(key.count(":") == 1 for key in result.metrics)
    if case in ("ppo", "gspo", "stable_reinforce"):  # both sides of the clip (or cap) are exercised
        fraction = result.metrics.get("clip_fraction:mean", result.metrics.get("truncated_fraction:mean"))
        assert 0 < fraction < 1
    got = grads(engine, aid)
    for path, (a, b) in leaves.items():
        assert_close_scaled(got[path + ".A"], a.grad)
        assert_close_scaled(got[path + ".B"], b.grad)
    assert any(g.abs().max() > 1e-3 for g in got.values())  # the comparison was not vacuous
    engine.remove_adapter(aid)


def assert_batched_equals_alone(engine, jobs, ids) -> list:
    """Run the jobs as one batch, then each alone: same losses, logprobs and gradients. Returns each
    adapter's gradients from the jobs alone, and removes the adapters."""
    together = engine.forward_backward(jobs)
    mixed_grads = {aid: grads(engine, aid) for aid in ids}
    for aid in ids:
        clear_grads(engine, aid)
    alone = [engine.forward_backward([job])[0] for job in jobs]
    for t, a in zip(together, alone):
        assert t.metrics["loss:sum"] == pytest.approx(a.metrics["loss:sum"], rel=1e-5, abs=1e-5)
        for to, ao in zip(t.outputs, a.outputs):
            assert to["logprobs"].shape == ao["logprobs"].shape
            np.testing.assert_allclose(to["logprobs"], ao["logprobs"], rtol=1e-5, atol=1e-5)
    separate = {}
    for aid in ids:
        separate[aid] = grads(engine, aid)
        for key, g in mixed_grads[aid].items():
            assert_close_scaled(g, separate[aid][key])
        engine.remove_adapter(aid)
    return [separate[aid] for aid in ids]


def test_mixed_adapter_batch_equals_each_alone(engine, new_id):
    """Adapters of different ranks and target sets, different losses, in ONE forward_backward call,
    give the same logprobs, losses and gradients as running each job on its own."""
    specs = [LoraSpec(rank=4, seed=1, train_mlp=False, train_unembed=False),
             LoraSpec(rank=8, seed=2, train_attn=False),
             LoraSpec(rank=2, seed=3)]
    ids = [new_id() for _ in specs]
    for i, (aid, spec) in enumerate(zip(ids, specs)):
        engine.create_adapter(aid, M, spec)
        randomize_b(engine, aid, seed=i)
    rng = np.random.default_rng(0)

    def rl(n):
        return random_datum(rng, n, logprobs=rng.normal(-8, 0.5, n), advantages=rng.normal(size=n))

    jobs = [
        ForwardBackwardJob(ids[0], [random_datum(rng, 7), random_datum(rng, 12)], "cross_entropy"),
        ForwardBackwardJob(ids[1], [rl(9)], "importance_sampling"),
        ForwardBackwardJob(ids[2], [rl(4), rl(10)], "ppo"),
        ForwardBackwardJob(ids[0], [random_datum(rng, 5)], "cross_entropy", forward_only=True),
        ForwardBackwardJob(ids[1], [rl(6)], "cispo"),
    ]
    for separate in assert_batched_equals_alone(engine, jobs, ids):
        assert any(g.abs().max() > 0 for g in separate.values())


@pytest.mark.parametrize("flags, expected", [
    (dict(train_attn=True, train_mlp=False, train_unembed=False), {"q_proj", "k_proj", "v_proj", "o_proj"}),
    (dict(train_attn=False, train_mlp=True, train_unembed=False), {"gate_proj", "up_proj", "down_proj"}),
    (dict(train_attn=False, train_mlp=False, train_unembed=True), {"lm_head"}),
])
def test_train_flags_select_modules(engine, ref_model, new_id, flags, expected):
    aid = new_id()
    engine.create_adapter(aid, M, LoraSpec(rank=3, seed=0, **flags))
    tensors = engine.adapter_tensors(aid)
    assert {path.rsplit(".", 1)[-1] for path in tensors} == expected
    layers = ref_model.config.num_hidden_layers
    assert len(tensors) == (1 if expected == {"lm_head"} else layers * len(expected))
    # The adapter changes the model only through those modules: engine == merged reference.
    randomize_b(engine, aid, seed=1, std=0.2)
    tokens = [3, 14, 15, 92, 65, 35]
    got = full_logprobs(engine, aid, tokens)
    every_token = np.tile(np.arange(V), (len(tokens), 1))
    want = reference_logprobs(ref_model, leaf_copies(engine, aid), LORA_ALPHA / 3, tokens, every_token)
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5, atol=1e-5)
    # Two steps change every adapter tensor (A moves from the second step: its first gradient is B^T... = 0
    # only when B = 0, so start from a fresh B) and no base weight.
    base_before = {k: v.clone() for k, v in engine._bases[M].model.state_dict().items()}
    before = {k: (a.clone(), b.clone()) for k, (a, b) in tensors.items()}
    for _ in range(2):
        engine.forward_backward([ForwardBackwardJob(aid, [datum(tokens)], "cross_entropy")])
        engine.optim_step(aid, AdamHyper(learning_rate=1e-2))
    for path, (a, b) in tensors.items():
        assert not torch.equal(a, before[path][0]) and not torch.equal(b, before[path][1]), path
    after = engine._bases[M].model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())
    engine.remove_adapter(aid)


def test_adapters_share_one_base_model(engine, new_id):
    model = engine._bases[M].model
    n_params = sum(p.numel() for p in model.parameters())
    ids = [new_id(), new_id()]
    for aid in ids:
        engine.create_adapter(aid, M, LoraSpec(rank=4))
    assert engine._bases[M].model is model
    assert sum(p.numel() for p in model.parameters()) == n_params  # adapters are not base parameters
    for aid in ids:
        engine.remove_adapter(aid)
        assert not engine.has_adapter(aid)
    assert all(not m.adapters or not set(ids) & set(m.adapters) for m in engine._bases[M].modules.values())


def test_same_seed_same_init(engine, new_id):
    a, b, c, d, e = (new_id() for _ in range(5))
    engine.create_adapter(a, M, LoraSpec(rank=8, seed=42))
    engine.create_adapter(b, M, LoraSpec(rank=8, seed=42))
    engine.create_adapter(c, M, LoraSpec(rank=8, seed=43))
    engine.create_adapter(d, M, LoraSpec(rank=8))
    engine.create_adapter(e, M, LoraSpec(rank=8))
    ta, tb, tc, td, te = (engine.adapter_tensors(x) for x in (a, b, c, d, e))
    assert all(torch.equal(ta[k][0], tb[k][0]) for k in ta)
    assert not torch.equal(ta["model.layers.0.self_attn.q_proj"][0], tc["model.layers.0.self_attn.q_proj"][0])
    assert not torch.equal(td["lm_head"][0], te["lm_head"][0])  # no seed: random
    assert all(not b_.any() for _, b_ in ta.values())  # B starts at zero
    bound = 1 / np.sqrt(64)
    assert all(a_.abs().max() <= bound for a_, _ in ta.values())
    for x in (a, b, c, d, e):
        engine.remove_adapter(x)


def test_gradients_accumulate_until_optim_step(engine, new_id):
    aid = new_id()
    engine.create_adapter(aid, M, LoraSpec(rank=4, seed=3))
    randomize_b(engine, aid, seed=3)
    rng = np.random.default_rng(1)
    d1, d2 = random_datum(rng, 8), random_datum(rng, 5)
    engine.forward_backward([ForwardBackwardJob(aid, [d1], "cross_entropy")])
    engine.forward_backward([ForwardBackwardJob(aid, [d2], "cross_entropy")])
    two_calls = grads(engine, aid)
    engine.forward_backward([ForwardBackwardJob(aid, [random_datum(rng, 6)], "cross_entropy", forward_only=True)])
    assert all(torch.equal(g, grads(engine, aid)[k]) for k, g in two_calls.items())  # forward_only: no gradient
    clear_grads(engine, aid)
    engine.forward_backward([ForwardBackwardJob(aid, [d1, d2], "cross_entropy")])
    for key, g in grads(engine, aid).items():
        assert_close_scaled(g, two_calls[key])
    engine.optim_step(aid, AdamHyper(learning_rate=1e-3))
    assert all(a.grad is None and b.grad is None for a, b in engine.adapter_tensors(aid).values())
    engine.remove_adapter(aid)


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "ppo"])
def test_a_job_whose_loss_touches_no_token_still_trains_its_adapter(engine, new_id, loss_fn):
    """All weights (or advantages) zero -- an RL group whose rewards are all equal -- beside a job that
    has some: the first adapter still gets its zero gradient, so its optimizer steps (Adam moves it on
    its moments) exactly as with the unembedding's backward over every position."""
    gate = "weights" if loss_fn == "cross_entropy" else "advantages"
    rng = np.random.default_rng(4)
    ids = [new_id(), new_id()]
    for i, aid in enumerate(ids):
        engine.create_adapter(aid, M, LoraSpec(rank=4, seed=i))
        randomize_b(engine, aid, seed=i)

    def job(aid, gated: bool):
        data = [random_datum(rng, 9, logprobs=np.full(9, -7.0)) for _ in range(3)]
        for d in data:
            d.inputs[gate] = np.zeros(9, np.float32) if gated else np.r_[np.zeros(6), np.ones(3)].astype(np.float32)
        return ForwardBackwardJob(aid, data, loss_fn)

    engine.forward_backward([job(ids[0], True), job(ids[1], False)])
    silent = grads(engine, ids[0])
    assert all(g.abs().max() == 0 for g in silent.values())  # present, and zero
    assert all(a.grad is not None and b.grad is not None for a, b in engine.adapter_tensors(ids[0]).values())
    for aid in ids:
        engine.remove_adapter(aid)


def _chat(tok, question, answer):
    prompt = tok.encode(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    completion = tok.encode(f"{answer}<|im_end|>")
    tokens = prompt + completion
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
    return prompt, datum(tokens[:-1], tokens[1:], weights=weights)


def test_finetune_halves_the_loss_and_the_sampler_learns_it(engine, new_id):
    tok = engine.tokenizer(M)
    facts = [("What is 12+7?", "12+7=19"), ("What is 3+5?", "3+5=8"), ("Say hello.", "Hello!"),
             ("What is 20-6?", "20-6=14")]
    examples = [_chat(tok, q, a) for q, a in facts]
    data = [d for _, d in examples]
    aid = new_id()
    engine.create_adapter(aid, M, LoraSpec(rank=8, seed=0))
    hyper = AdamHyper(learning_rate=3e-3)  # Tinker's defaults otherwise
    losses = []
    for _ in range(20):
        (result,) = engine.forward_backward([ForwardBackwardJob(aid, data, "cross_entropy")])
        losses.append(result.metrics["loss:sum"])
        engine.optim_step(aid, hyper)
    assert losses[-1] < losses[0] / 2, losses
    # Keep going and the adapter answers, ending at EOS (<|im_end|>) with stop_reason "stop".
    for _ in range(40):
        engine.forward_backward([ForwardBackwardJob(aid, data, "cross_entropy")])
        engine.optim_step(aid, hyper)
    prompt, _ = examples[0]
    (res,) = engine.sample([SampleJob(M, aid, prompt, max_tokens=20, temperature=0.0)])
    (seq,) = res.sequences
    assert tok.decode(seq.tokens) == "12+7=19<|im_end|>" and seq.stop_reason == "stop"
    # With stop_token_ids=[] nothing stops it: it runs to max_tokens.
    (res,) = engine.sample([SampleJob(M, aid, prompt, max_tokens=20, temperature=0.0, stop_token_ids=[])])
    assert len(res.sequences[0].tokens) == 20 and res.sequences[0].stop_reason == "length"
    engine.remove_adapter(aid)


def test_big_calls_split_into_micro_batches_with_the_same_result(engine, new_id, monkeypatch):
    from tinkex.engine import training

    ids = [new_id(), new_id()]
    for i, aid in enumerate(ids):
        engine.create_adapter(aid, M, LoraSpec(rank=3, seed=i))
        randomize_b(engine, aid, seed=i)
    rng = np.random.default_rng(4)
    rl = [random_datum(rng, n, logprobs=rng.normal(-8, 1, n), advantages=rng.normal(size=n)) for n in (9, 4, 12, 7)]
    jobs = [ForwardBackwardJob(ids[0], [random_datum(rng, n) for n in (5, 13, 8)], "cross_entropy"),
            ForwardBackwardJob(ids[1], rl, "ppo"),
            ForwardBackwardJob(ids[1], rl[::-1], "gspo", {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0})]
    whole = engine.forward_backward(jobs)
    whole_grads = {aid: grads(engine, aid) for aid in ids}
    for aid in ids:
        clear_grads(engine, aid)
    monkeypatch.setattr(training, "MAX_BATCH_TOKENS", 30)  # at most two short datums per forward
    split = engine.forward_backward(jobs)
    for w, s in zip(whole, split):
        assert s.metrics == pytest.approx(w.metrics, rel=1e-5, abs=1e-5)
        for wo, so in zip(w.outputs, s.outputs):
            np.testing.assert_allclose(so["logprobs"], wo["logprobs"], atol=1e-5)
    for aid in ids:
        for key, g in grads(engine, aid).items():
            assert_close_scaled(g, whole_grads[aid][key])
        engine.remove_adapter(aid)


def test_soft_targets_mixed_with_one_hot_jobs_equal_each_alone(engine, new_id):
    """A batch where one job has [T, K] soft targets and the others one target per position (each
    job's logprobs then come from its own split of the batch's logits) gives the same logprobs,
    losses and gradients as each job alone."""
    ids = [new_id(), new_id()]
    for i, aid in enumerate(ids):
        engine.create_adapter(aid, M, LoraSpec(rank=4, seed=10 + i))
        randomize_b(engine, aid, seed=10 + i)
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, V, 6)
    soft = datum(tokens, rng.integers(0, V, (6, 3)), weights=rng.uniform(0, 1, (6, 3)))
    jobs = [ForwardBackwardJob(ids[0], [random_datum(rng, 9)], "cross_entropy"),
            ForwardBackwardJob(ids[1], [soft, datum(tokens, rng.integers(0, V, (6, 3)), weights=np.ones((6, 3)))],
                               "cross_entropy"),
            ForwardBackwardJob(ids[0], [random_datum(rng, 4)], "cross_entropy")]
    assert engine.forward_backward([jobs[1]])[0].outputs[0]["logprobs"].shape == (6, 3)
    for aid in ids:
        clear_grads(engine, aid)
    assert_batched_equals_alone(engine, jobs, ids)


def test_soft_targets_of_different_widths_in_one_job_are_refused(engine, new_id):
    aid = new_id()
    engine.create_adapter(aid, M, LoraSpec(rank=2, seed=0))
    tokens = np.arange(1, 5)
    job = ForwardBackwardJob(aid, [datum(tokens, np.ones((4, 3), np.int64)), datum(tokens, np.ones((4, 5), np.int64))],
                             "cross_entropy")
    (result,) = engine.forward_backward([job])
    assert isinstance(result, EngineError) and "same K" in str(result) and "[3, 5]" in str(result)
    engine.remove_adapter(aid)


def test_many_tenants_of_one_shape_equal_each_alone(engine, new_id):
    """The many-tenant workload (bench/tenants.py): eight adapters of one rank and target set, each
    with its own batch of short sequences, in ONE call -- same losses and gradients as alone."""
    ids = [new_id() for _ in range(8)]
    for i, aid in enumerate(ids):
        engine.create_adapter(aid, M, LoraSpec(rank=8, seed=20 + i))
        randomize_b(engine, aid, seed=20 + i)
    rng = np.random.default_rng(8)
    jobs = [ForwardBackwardJob(aid, [random_datum(rng, 14) for _ in range(3)], "cross_entropy") for aid in ids]
    for separate in assert_batched_equals_alone(engine, jobs, ids):
        assert all(g.abs().max() > 0 for g in separate.values())  # every module of every adapter learned


@pytest.mark.parametrize("index_shape", [(37, 1), (37, 5)])
def test_target_logprobs_equals_log_softmax_gather(index_shape):
    """The fused target log-probabilities: the same values and gradients as the composed ops,
    repeated target columns included (soft targets may name a token twice)."""
    from tinkex.engine.training import TargetLogprobs

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 50, dtype=torch.float64, generator=generator) * 4
    index = torch.randint(0, 50, index_shape, generator=generator)
    index[:, -1] = index[:, 0]
    weights = torch.randn(index_shape, dtype=torch.float64, generator=generator)
    ours, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    fused = TargetLogprobs.apply(ours, index)
    composed = theirs.log_softmax(-1).gather(1, index)
    torch.testing.assert_close(fused, composed, rtol=0, atol=0)
    (fused * weights).sum().backward()
    (composed * weights).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad)


def test_steady_training_steps_reuse_memory(engine, new_id):
    """Once warm, a many-tenant step's big tensors (logits, their gradients: megabytes, fresh each
    step) come from memory the process already has: almost no page faults. With glibc's default
    thresholds each such block was a new mapping -- about 1,800 faults per step of this batch."""
    import resource
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("page-fault counts and glibc's malloc are Linux's")
    ids = [new_id() for _ in range(4)]
    for i, aid in enumerate(ids):
        engine.create_adapter(aid, M, LoraSpec(rank=32, seed=40 + i))
    rng = np.random.default_rng(4)
    jobs = [ForwardBackwardJob(aid, [random_datum(rng, 14) for _ in range(8)], "cross_entropy") for aid in ids]
    for _ in range(3):
        engine.forward_backward(jobs)
    # This thread's faults only (the step runs on it): other threads of the test process are not the step's.
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(10):
        engine.forward_backward(jobs)
    faults_per_step = (resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) / 10
    assert faults_per_step < 100, faults_per_step
