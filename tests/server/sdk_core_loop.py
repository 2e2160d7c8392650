"""The core loop, written against the official SDK; run by tests under other installed SDK versions.

Usage: python sdk_core_loop.py BASE_URL API_KEY  -> prints one JSON line with what it observed.
"""

import json
import sys

import numpy as np
import tinker
from tinker import types

base_url, api_key = sys.argv[1], sys.argv[2]


def ready(client_or_future):
    """0.38 returns futures of clients, 0.25 the clients themselves."""
    return client_or_future.result() if hasattr(client_or_future, "result") else client_or_future



client = tinker.ServiceClient(base_url=base_url, api_key=api_key)
training = ready(client.create_lora_training_client(base_model="tinkex/tiny-qwen3", rank=8, seed=0))
tokenizer = training.get_tokenizer()
batch = []
for text in ["cat says meow", "dog says woof", "cow says moo", "owl says hoot"]:
    tokens = tokenizer.encode(text) + [tokenizer.eos_token_id]
    batch.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                             loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64),
                                             "weights": np.ones(len(tokens) - 1, dtype=np.float32)}))
losses = []
for _ in range(16):
    fb = training.forward_backward(batch, "cross_entropy")
    step = training.optim_step(types.AdamParams(learning_rate=5e-3))
    losses.append(fb.result().metrics["loss:sum"])
    step.result()
state = training.save_state("core-loop").result().path
sampler = ready(training.save_weights_and_get_sampling_client(name="core-loop-sampler"))
prompt = types.ModelInput.from_ints(tokenizer.encode("cat says"))
sample = sampler.sample(prompt=prompt, num_samples=2,
                        sampling_params=types.SamplingParams(max_tokens=4, temperature=0.0)).result()
logprobs = sampler.compute_logprobs(prompt).result()
resumed = ready(client.create_training_client_from_state(state))
resumed_loss = resumed.forward(batch, "cross_entropy").result().metrics["loss:sum"]
final_loss = training.forward(batch, "cross_entropy").result().metrics["loss:sum"]
print(json.dumps({
    "version": tinker.__version__, "losses": losses, "state": state,
    "sample": [s.tokens for s in sample.sequences], "first_logprob": logprobs[0], "n_logprobs": len(logprobs),
    "resumed_loss": resumed_loss, "final_loss": final_loss,
}))
