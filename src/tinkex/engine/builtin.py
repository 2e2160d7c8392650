"""The built-in model `tinkex/tiny-qwen3`: a small random-init Qwen3 that needs no network.

Its tokenizer ships with the package (assets/tiny-qwen3, built by scripts/build_tiny_tokenizer.py);
its weights are generated from `torch.manual_seed(0)`. `materialize` writes both into the Hugging
Face hub cache as an ordinary snapshot (`models--tinkex--tiny-qwen3/refs/main` and
`snapshots/<40 hex>/`), so that every process on the machine -- the official SDK loading the
tokenizer by name included -- can `from_pretrained("tinkex/tiny-qwen3")` with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import uuid
from pathlib import Path

from .api import BUILTIN_MODEL
from .util import quiet_progress

ASSET_DIR = Path(__file__).parent / "assets" / "tiny-qwen3"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SNAPSHOT_FILES = ("config.json", "model.safetensors", *TOKENIZER_FILES)
# Bump when the recipe changes in a way the config below does not show (e.g. the init procedure):
# the snapshot name is a hash of the recipe, so a new recipe lands in a new snapshot.
RECIPE_VERSION = 1

# Seeding the init touches torch's process-wide RNG (restored afterwards): one build at a time per
# process, or two threads would interleave their draws. Processes racing are handled by the rename.
_BUILD_LOCK = threading.Lock()

# Qwen3 architecture, scaled down. Token ids match the shipped tokenizer
# (<|endoftext|>=0, <|im_start|>=1, <|im_end|>=2).
CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 2048,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "initializer_range": 0.02,
    "bos_token_id": None,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "use_cache": True,
}


def hub_cache_dir(hf_home: Path | None = None) -> Path:
    """Where the hub cache is: `hf_home`/hub, else $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if hf_home is not None:
        return Path(hf_home) / "hub"
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def snapshot_revision() -> str:
    """The 40-hex snapshot name: a hash of everything the snapshot is built from."""
    digest = hashlib.sha1(f"tinkex tiny-qwen3 recipe {RECIPE_VERSION}\n".encode())
    digest.update(json.dumps(CONFIG, sort_keys=True).encode())
    for name in TOKENIZER_FILES:
        digest.update((ASSET_DIR / name).read_bytes())
    return digest.hexdigest()


def repo_dir(cache_dir: Path) -> Path:
    return cache_dir / ("models--" + BUILTIN_MODEL.replace("/", "--"))


def materialize(cache_dir: Path) -> Path:
    """Make sure the built-in snapshot is in `cache_dir` and return its directory.

    Cheap when it is already there (a few stat calls). Otherwise it is built in a temporary
    directory and renamed into place, so that racing processes never see a half-written snapshot:
    the first rename wins and the others discard their copy.
    """
    revision = snapshot_revision()
    repo = repo_dir(cache_dir)
    snapshot = repo / "snapshots" / revision
    if not _complete(snapshot):
        (repo / "snapshots").mkdir(parents=True, exist_ok=True)
        tmp = repo / f".tmp-{uuid.uuid4().hex}"
        try:
            _build(tmp)
            if snapshot.exists() and not _complete(snapshot):  # damaged (files deleted): move it aside
                _discard(snapshot, repo)
            try:
                os.rename(tmp, snapshot)
            except OSError:
                if not _complete(snapshot):  # not a lost race but a real failure
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    ref = repo / "refs" / "main"
    if not ref.is_file() or ref.read_text().strip() != revision:
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp_ref = ref.with_name(f".main-{uuid.uuid4().hex}")
        tmp_ref.write_text(revision)
        os.replace(tmp_ref, ref)
    return snapshot


def _complete(snapshot: Path) -> bool:
    return all((snapshot / name).is_file() for name in SNAPSHOT_FILES)


def _discard(path: Path, repo: Path) -> None:
    trash = repo / f".trash-{uuid.uuid4().hex}"
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _build(directory: Path) -> None:
    """Write config, deterministic random weights and the shipped tokenizer into `directory`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_kwargs = {k: v for k, v in CONFIG.items() if k != "model_type"}
    config = AutoConfig.for_model(CONFIG["model_type"], **config_kwargs)
    # fork_rng: seed the init without disturbing the global RNG of the process we run in.
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).float()
    with quiet_progress():  # no progress bar in the server log for a 1 MB write
        model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copyfile(ASSET_DIR / name, directory / name)
