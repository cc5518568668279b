"""schemathesis against the OpenAPI schema of the running server (the session's Serve app).

Every operation in `/openapi.json` gets a bounded number of generated requests in both of
schemathesis' modes: positive (conforming to the schema) and negative (violating it). Every response
goes through schemathesis' response checks (no 5xx, status codes and content types the schema
declares, response bodies and headers that match it, negative data rejected) except the ones in
EXCLUDED, each with its reason.

(`schemathesis.pytest.from_fixture` / `@schema.parametrize()` would be the idiomatic form, but its
lazy loader writes pytest's private `Function._nodeid`, which pytest 9 no longer has; the operations
are parametrized here from the app's own schema instead, and schemathesis' Python API does the rest.)
"""

from __future__ import annotations

import pytest
import schemathesis

# imported now, at collection, not lazily by `from_url` inside a fixture: pytest rewrites schemathesis'
# modules (a pytest plugin) with ast.parse, and CPython 3.11.7's AST recursion bookkeeping, once thrown
# off in this long-lived process (python/cpython#106905, fixed in 3.11.8), fails every later parse with
# "SystemError: AST constructor recursion depth mismatch" — seen once on 2026-12-07 as 59 setup errors
import schemathesis.specs.openapi.schemas  # noqa: F401
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from services.ingress.ingress import create_app

app = create_app()

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

EXAMPLES = 40
EXCLUDED = [
    # The schema can say "a binary file", not "a NIfTI volume or a .npy array": random bytes conform to
    # the schema and are rightly refused with 400, which this check would count as a failure. The
    # hypothesis tests in tests/integration/test_fuzz_rest.py send real NIfTI/.npy payloads instead.
    positive_data_acceptance,
]
_SPEC = app.openapi()["paths"]
OPERATIONS = [f"{m.upper()} {p}" for p, item in _SPEC.items() for m in item]
# Negative mode needs an input that can violate the schema: the routes with a request body. The GET
# routes take no parameters and DELETE takes one free-form string, so no schema-violating request
# exists for them (hypothesis reports Unsatisfiable); their bad paths are in tests/integration/test_fuzz_rest.py.
CASES = [(op, GenerationMode.POSITIVE) for op in OPERATIONS] + [
    (f"{m.upper()} {p}", GenerationMode.NEGATIVE) for p, item in _SPEC.items() for m, o in item.items() if "requestBody" in o
]


@pytest.fixture(scope="module")
def vessa_schema(serve_app):
    return schemathesis.openapi.from_url(serve_app.url + "/openapi.json")


def test_the_served_schema_is_the_apps(vessa_schema):
    served = sorted(f"{op.ok().method.upper()} {op.ok().path}" for op in vessa_schema.get_all_operations())
    assert served == sorted(OPERATIONS)
    # negatives for exactly the routes with a request body (every POST and PUT here)
    assert sum(mode == GenerationMode.NEGATIVE for _, mode in CASES) == sum(op.startswith(("POST ", "PUT ")) for op in OPERATIONS)


@pytest.mark.parametrize("label,mode", CASES, ids=[f"{op}-{mode.value}" for op, mode in CASES])
def test_openapi_operation(vessa_schema, serve_app, label, mode):
    operation = vessa_schema.find_operation_by_label(label)
    assert operation is not None, label

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case):
        if case.method.upper() == "DELETE":
            # Never delete a real exemplar of the shared bank: generated ids are prefixed out of reach.
            case.path_parameters = {k: f"zz-{v}" for k, v in (case.path_parameters or {}).items()}
        response = case.call(base_url=serve_app.url, timeout=60)
        assert response.status_code < 500, f"{label}: {response.status_code} {response.text[:300]}"
        case.validate_response(response, excluded_checks=EXCLUDED)

    check()
