"""One real `ember serve` subprocess on loopback for the server tests, with small limits."""

from __future__ import annotations

import pytest

from server_helpers import MAX_BODY_BYTES, MAX_MODEL_LEN, MAX_QUEUED_REQUESTS, Server, running_server

SERVER_FLAGS = ["--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "64", "--max-num-seqs", "4",
                "--max-queued-requests", str(MAX_QUEUED_REQUESTS), "--max-request-body-bytes", str(MAX_BODY_BYTES)]


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    with running_server(SERVER_FLAGS, tmp_path_factory.mktemp("serve")) as running:
        yield running


@pytest.fixture(scope="session")
def server_twin_llm():
    """An offline engine set up as the `server` fixture's (bundled model, bfloat16, the same limits), so the
    same prompt computed alone gives the same numbers on both."""
    from ember import LLM
    return LLM(max_model_len=MAX_MODEL_LEN, num_kv_blocks=64, max_num_seqs=4)
