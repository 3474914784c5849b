"""Schemathesis against a real `ember serve`: the OpenAPI document says what the server does.

Every operation gets bodies that fit its schema (positive) and bodies that do not (negative), seeded and
bounded. No answer may be a 5xx; each status must be one the document lists for the operation, with the
documented content type and a body matching its schema; a schema-invalid body must be refused with a 4xx.
The server runs the tiny random Llama (fast to generate with) and small limits, so a run takes a minute or two.
"""

from __future__ import annotations

from collections import Counter

import httpx
import pytest

from server_helpers import API_KEY, running_server

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402  (schemathesis brings hypothesis)
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,  # noqa: E402
                                               response_schema_conformance, status_code_conformance)

MAX_EXAMPLES = {GenerationMode.POSITIVE: 80, GenerationMode.NEGATIVE: 80}  # per operation
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
FLAGS = ["--max-model-len", "64", "--num-kv-blocks", "32", "--max-num-seqs", "4", "--max-n", "2",
         "--max-logprobs", "2", "--max-queued-requests", "64", "--max-request-body-bytes", str(1 << 16)]


@pytest.fixture(scope="module")
def fuzz_server(tiny_llama_dir, tmp_path_factory):
    with running_server(["--model", tiny_llama_dir, *FLAGS], tmp_path_factory.mktemp("fuzz")) as running:
        yield running


def fuzz(base_url: str, max_examples: dict = MAX_EXAMPLES) -> tuple[list[str], Counter]:
    """Run every operation of the server's document in both modes.

    Returns:
        the failures (each with the request that caused it) and the count of each
        (operation, mode, status) answered.
    """
    document = httpx.get(base_url + "/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(document)
    failures: list[str] = []
    statuses: Counter = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode, num_examples in max_examples.items():
            try:
                _fuzz_operation(operation, mode, num_examples, base_url, statuses)
            except Unsatisfiable:  # an operation without inputs has no schema-invalid request
                continue
            except Exception as exc:  # a failed check, with the request that caused it
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    return failures, statuses


def _fuzz_operation(operation, mode: GenerationMode, num_examples: int, base_url: str, statuses: Counter) -> None:
    @settings(max_examples=num_examples, derandomize=True, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
        statuses[operation.label, mode.value, response.status_code] += 1
        case.validate_response(response, checks=CHECKS)

    run()


def test_server_conforms_to_its_openapi_document(fuzz_server):
    failures, statuses = fuzz(fuzz_server.base_url)
    assert not failures, "\n\n".join(failures)
    # the run reached generation: schema-valid bodies were served on every POST route, not all refused
    for label in ("POST /v1/chat/completions", "POST /v1/completions", "POST /tokenize", "POST /detokenize"):
        assert statuses[label, "positive", 200] > 0, sorted(statuses.items())
    assert httpx.get(fuzz_server.base_url + "/health", timeout=30).status_code == 200


def test_document_lists_errors_and_content_types(fuzz_server):
    document = httpx.get(fuzz_server.base_url + "/openapi.json", timeout=30).json()
    paths = document["paths"]
    assert "content" not in paths["/health"]["get"]["responses"]["200"]  # an empty 200
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    chat = paths["/v1/chat/completions"]["post"]
    assert set(chat["responses"]) == {"200", "400", "401", "404", "413", "429", "500", "501", "503"}
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "422" not in str(document["paths"]) and chat["security"] == [{"APIKey": []}]
    schemas = document["components"]["schemas"]
    assert schemas["ChatCompletionRequest"]["properties"]["messages"]["minItems"] == 1
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert all(branch.get("minLength", branch.get("minItems")) == 1 for branch in prompt)
