"""The zero-configuration default: no base URL and no key start the embedded server on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

PROGRAM = textwrap.dedent("""
    import json, sys
    import tinkex
    from tinkex import types

    light = not any(name in sys.modules for name in ("torch", "transformers", "tinkex.server", "fastapi"))
    service = tinkex.ServiceClient()
    trainer = service.create_lora_training_client("tinkex/tiny-qwen3", rank=8, seed=0).result(120)
    tokens = trainer.get_tokenizer().encode("embedded servers need no configuration")
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
    losses = []
    for _ in range(6):
        fb = trainer.forward_backward([datum], "cross_entropy")
        trainer.optim_step(types.AdamParams(learning_rate=5e-3))
        losses.append(fb.result().metrics["loss:sum"])
    sampler = trainer.save_weights_and_get_sampling_client().result()
    sample = sampler.sample(types.ModelInput.from_ints(tokens[:4]), 1, types.SamplingParams(max_tokens=4)).result()
    runs = tinkex.RestClient().list_training_runs().result()
    service.close().result()
    print("RESULT " + json.dumps({
        "light": light, "base_url": service.holder.base_url, "losses": losses,
        "sampled": len(sample.sequences[0].tokens), "runs": [r.training_run_id for r in runs.training_runs],
        "model_id": trainer.model_id}))
""")


def test_embedded_server_by_default(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TINKER_BASE_URL", "TINKER_API_KEY", "TINKER_CREDENTIAL_CMD")}
    env.update(TINKEX_HOME=str(tmp_path / "data"), HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["light"], "importing tinkex must not import the server, torch or transformers"
    assert result["base_url"].startswith("http://127.0.0.1:")
    assert result["losses"][-1] < result["losses"][0]
    assert result["sampled"] >= 1
    assert result["model_id"] in result["runs"]  # RestClient() found the same embedded server
    data = tmp_path / "data"
    assert (data / "api_key").read_text().startswith("tml-")  # data lives in the per-user directory
    assert any(data.iterdir())
