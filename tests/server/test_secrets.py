"""Keys never reach the logs or the disk, and nothing deserializes or evaluates what a request sends.

The first test runs the real app in a subprocess as verbosely as it can be made (every logger at
DEBUG, SQL statements with their parameters, uvicorn at TRACE with its access log), sends keys every
way a client may send them, and searches the whole output and every file of the data directory for
them. The second reads the server and engine sources: deserializers and evaluators that could run
attacker bytes are allowed only where listed below, with the reason.
"""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .test_protocol import MODEL, PROTO, datum, fb_body

VALID = "tml-secret-valid-key-7f3a9c1d2e"
OTHER_VALID = "tml-secret-second-key-c0ffee42"
INVALID = "tml-secret-invalid-key-51b2e8aa"
KEYS = (VALID, OTHER_VALID, INVALID)

# The real app, as verbose as it gets. Keys come in through the environment, not the command line.
VERBOSE_SERVER = """
import json, logging, os, sys
from pathlib import Path
import torch, uvicorn
from tinkex.server.app import create_app
from tinkex.server.runtime import ServerSettings
torch.set_num_threads(1)
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
logging.getLogger("sqlalchemy.engine").setLevel(logging.DEBUG)  # every statement with its parameters
settings = ServerSettings(data_dir=Path(sys.argv[1]), port=int(sys.argv[2]),
                          api_keys=json.loads(os.environ.pop("TEST_KEYS")))
uvicorn.run(create_app(settings), host="127.0.0.1", port=settings.port, log_level="trace", access_log=True)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_keys_never_reach_logs_or_disk(tmp_path, hf_home):
    data_dir, port = tmp_path / "data", _free_port()
    log_file = tmp_path / "server.log"
    env = {**os.environ, "TEST_KEYS": f'{{"{VALID}": "alice", "{OTHER_VALID}": "bob"}}', "PYTHONUNBUFFERED": "1"}
    with open(log_file, "wb") as log:
        server = subprocess.Popen([sys.executable, "-c", VERBOSE_SERVER, str(data_dir), str(port)], stdout=log,
                                  stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/api/v1/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, log_file.read_text()[-3000:]
            time.sleep(0.2)
        by_header = httpx.Client(base_url=base + "/api/v1", headers={"X-API-Key": VALID}, timeout=60)
        by_bearer = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {OTHER_VALID}"}, timeout=60)

        # real work with a valid key in each place: a session, a model, a step, a checkpoint, a sample
        session = by_header.post("/create_session", json={"tags": [], "sdk_version": "t"}).json()["session_id"]
        model = by_header.post("/create_model", json={"session_id": session, "model_seq_id": 0, "base_model": MODEL,
                                                      "lora_config": {"rank": 4}}).json()
        for request in (by_header.post("/forward_backward", content=fb_body(model["model_id"], 1, [datum([1, 2, 3])]),
                                       headers=PROTO),
                        by_header.post("/save_weights", json={"model_id": model["model_id"], "path": "c", "seq_id": 2})):
            request_id = request.json()["request_id"]
            while by_header.post("/retrieve_future", json={"request_id": request_id}).json().get("type") == "try_again":
                pass
        assert by_bearer.get("/api/v1/training_runs").status_code == 200
        completion = by_bearer.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2], "max_tokens": 2})
        assert completion.status_code == 200
        # bad input and errors with a valid key: the error paths log too
        assert by_header.post("/get_info", json={"model_id": "nope"}).status_code == 404
        assert by_header.post("/create_model", json={"session_id": 3}).status_code == 400
        # invalid keys, and keys sent in odd ways
        for headers in ({"X-API-Key": INVALID}, {"Authorization": f"Bearer {INVALID}"},
                        {"Authorization": f"bearer {INVALID}"}, {"Authorization": f"Basic {INVALID}"},
                        {"Authorization": INVALID}, {"X-API-Key": f"{INVALID}x"}, {"X-API-Key": VALID[:-1]}):
            answer = httpx.get(base + "/api/v1/training_runs", headers=headers)
            assert answer.status_code == 401 and INVALID not in answer.text
        assert httpx.get(base + "/metrics").status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)

    output = log_file.read_bytes()
    # the logs are really verbose: access lines, SQL with parameters, the app's own debug lines
    assert b'"POST /api/v1/create_model HTTP/1.1" 200' in output and b"INSERT INTO" in output
    assert b"[generated in" in output or b"[cached since" in output  # SQL parameters are logged
    assert b"401" in output
    for key in KEYS:
        for form in (key.encode(), key.encode("utf-16-le"), key[4:].encode()):
            assert form not in output, f"a key reached the server's output: {key}"
    files = [path for path in data_dir.rglob("*") if path.is_file()]
    assert any(path.name == "tinkex.db" for path in files) and len(files) > 3
    for path in files:
        content = path.read_bytes()
        for key in KEYS:
            assert key[4:].encode() not in content, f"a key is stored in {path.relative_to(data_dir)}"


# ---- nothing deserializes or evaluates request data -----------------------------------------------

SOURCES = [Path(__file__).resolve().parents[2] / "src" / "tinkex" / part for part in ("server", "engine")]
# Modules that turn bytes into live objects (or run code): importing one needs an entry here.
DESERIALIZERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle",
                 "joblib", "multiprocessing", "ray"}
ALLOWED_IMPORTS = {
    ("engine/workers.py", "pickle"): "pickles and unpickles an exception the worker itself raised, to check it "
                                     "can cross the pipe; no request bytes",
    ("engine/workers.py", "multiprocessing"): "a private pipe between the server and the worker processes it "
                                              "spawned; both ends are this code, request data crosses as values "
                                              "the server built after validating the request",
    ("engine/ray_workers.py", "ray"): "Ray actor calls between the server and its own actors (same trust as the "
                                      "worker pipe)",
}


def _parse(path: Path) -> ast.Module:
    # CPython 3.11 keeps the AST constructor's recursion count in module-wide state, so another thread
    # building AST objects meanwhile (a background thread of an earlier test) can make ast.parse raise
    # "SystemError: AST constructor recursion depth mismatch" (python/cpython#106905); parse again.
    for attempt in range(3):
        try:
            return ast.parse(path.read_text(), filename=str(path))
        except SystemError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _scan(path: Path) -> list[str]:
    """What in this file could deserialize or evaluate untrusted bytes, as 'construct' strings."""
    found = []
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Import):
            found += [alias.name.split(".")[0] for alias in node.names if alias.name.split(".")[0] in DESERIALIZERS]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in DESERIALIZERS:
            found.append(node.module.split(".")[0])
        elif isinstance(node, ast.Call):
            func = node.func
            keywords = {kw.arg: kw.value for kw in node.keywords}
            if isinstance(func, ast.Name) and func.id in ("eval", "exec", "__import__"):
                found.append(f"{func.id}()")
            elif isinstance(func, ast.Attribute):
                owner = ast.unparse(func.value)
                if owner == "yaml" and func.attr in ("load", "load_all", "unsafe_load", "full_load"):
                    found.append(f"yaml.{func.attr}()")
                elif owner == "torch" and func.attr == "load":
                    weights_only = keywords.get("weights_only")
                    if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                        found.append("torch.load() without weights_only=True")
                elif func.attr == "load" and owner in ("np", "numpy"):
                    allow = keywords.get("allow_pickle")
                    if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                        found.append("numpy.load(allow_pickle=...)")
                elif func.attr in ("read_pickle", "from_pickle"):
                    found.append(f"{func.attr}()")
    return found


def test_no_code_deserializes_or_evaluates_request_data():
    files = [path for root in SOURCES for path in sorted(root.rglob("*.py"))]
    assert len(files) > 20
    flagged = {}
    for path in files:
        relative = path.relative_to(SOURCES[0].parent).as_posix()
        for construct in _scan(path):
            if (relative, construct) not in ALLOWED_IMPORTS:
                flagged.setdefault(relative, []).append(construct)
    assert flagged == {}, "unsafe deserialization or evaluation; remove it or add it to ALLOWED_IMPORTS with why"


def test_the_scan_finds_what_it_looks_for(tmp_path):
    # the static check above is only worth something if it recognises each pattern
    sample = tmp_path / "bad.py"
    sample.write_text("import pickle\nfrom dill import loads\nimport yaml, torch, numpy as np\n"
                      "eval(x)\nexec(y)\nyaml.load(s)\ntorch.load(f)\ntorch.load(f, weights_only=False)\n"
                      "np.load(f, allow_pickle=True)\n"
                      "yaml.safe_load(s)\ntorch.load(f, weights_only=True)\nnp.load(f)\n")
    assert sorted(_scan(sample)) == sorted(["pickle", "dill", "eval()", "exec()", "yaml.load()",
                                            "torch.load() without weights_only=True",
                                            "torch.load() without weights_only=True", "numpy.load(allow_pickle=...)"])
