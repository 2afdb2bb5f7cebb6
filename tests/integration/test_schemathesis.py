"""Schemathesis against ``/schema/openapi.json`` (issue 10, point 4; invariant 7).

Every operation of the OpenAPI document is called with generated input, once with the
admin (compliance) key and once with a team key (``support``), against the ASGI app on
an embedded database with the demo organisation (teams, keys, starter policy) and a
few customers. Each response must be no 5xx and conform to the document: a declared
status code, a declared content type and a body matching the declared schema.

The run is bounded (``MAX_EXAMPLES`` per operation and role, no deadline) so the whole
of it stays well under three minutes. The figures (operations, cases) are printed at
the end of the module and kept in ``FIGURES`` for the closing note.
"""

from __future__ import annotations

import tomllib
from collections import Counter
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.python import asgi

from tests.conftest import ADMIN_KEY, DEMO_TEAMS, make_settings

MAX_EXAMPLES = 15
NEGATIVE_EXAMPLES = 5
FIGURES: Counter[str] = Counter()
OPERATIONS: dict[str, set[str]] = {"admin": set(), "team": set()}


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One app for the whole module: its lifespan runs on schemathesis' ASGI portal."""
    from api.app import create_app

    tmp: Path = tmp_path_factory.mktemp("fuzz")
    app = create_app(
        make_settings(
            tmp,
            f"sqlite+aiosqlite:///{tmp / 'storyvault.db'}",
            rate_limit_per_minute=10_000_000,
        )
    )
    schema = schemathesis.openapi.from_asgi("/schema/openapi.json", app)  # starts the lifespan
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    headers = {"admin": admin}
    with asgi.get_client(app) as http:
        for team in DEMO_TEAMS:
            assert (
                http.post("/v1/admin/teams", json={"name": team}, headers=admin).status_code == 201
            )
            key = http.post(f"/v1/admin/teams/{team}/keys", json={}, headers=admin).json()["key"]
            headers[team] = {"Authorization": f"Bearer {key}"}
        raw = resources.files("governance").joinpath("demo_policy.toml").read_text()
        for rule in tomllib.loads(raw)["rules"]:
            resp = http.post("/v1/admin/policies", json=rule, headers=admin)
            assert resp.status_code == 201, resp.text
        customers = []
        for n in range(3):
            resp = http.post(
                "/v1/customers?purpose=service.support",
                json={"profile": {"name": f"Fuzz Customer {n}"}},
                headers=headers["support"],
            )
            assert resp.status_code == 201, resp.text
            customers.append(resp.json()["id"])
    try:
        yield {"app": app, "schema": schema, "headers": headers, "customers": customers}
    finally:
        print(
            f"\nschemathesis: {len(OPERATIONS['admin'] | OPERATIONS['team'])} operations, "
            f"{FIGURES['admin']} cases as admin, {FIGURES['team']} cases as team "
            f"({FIGURES['admin'] + FIGURES['team']} in all), "
            f"status classes {dict(sorted((k, v) for k, v in FIGURES.items() if 'xx' in k))}"
        )
        asgi.shutdown_lifespans()


def _configure(loaded: Any) -> Any:
    loaded.config.generation.update(max_examples=MAX_EXAMPLES, deterministic=True)
    # Every check: no 5xx, declared status codes, content types, response headers and
    # bodies. Three are left out, each for a reason:
    # - positive_data_acceptance: generated "valid" input is routinely refused for reasons
    #   the schema cannot express (an unknown purpose, a customer id that is a well-formed
    #   string but no customer, a policy the team lacks); those refusals are 4xx problems
    #   that the status-code check already holds to the document.
    # - use_after_free / ensure_resource_availability: stateful checks about resources
    #   created and deleted through links within one run; this run follows no links.
    loaded.config.checks.update(
        excluded_check_names=[
            "positive_data_acceptance",
            "use_after_free",
            "ensure_resource_availability",
        ]
    )
    return loaded


def _modes(operation: Any, customer: str) -> list[tuple[str, Any]]:
    """Schema-valid input, schema-invalid input, and — where the path names a customer —
    schema-valid input about a real customer for a real purpose, so the gated paths are
    exercised past the 404 (random ids name no customer)."""
    modes = [
        ("positive", operation.as_strategy(GenerationMode.POSITIVE)),
        ("negative", operation.as_strategy(GenerationMode.NEGATIVE)),
    ]
    if "customer_id" in {p.name for p in operation.path_parameters}:
        query = (
            {"purpose": "service.support"}
            if "purpose" in {p.name for p in operation.query}
            else None
        )
        modes.append(
            (
                "real customer",
                operation.as_strategy(
                    GenerationMode.POSITIVE, path_parameters={"customer_id": customer}, query=query
                ),
            )
        )
    return modes


EXAMPLES = {"positive": MAX_EXAMPLES, "negative": NEGATIVE_EXAMPLES, "real customer": MAX_EXAMPLES}


@pytest.mark.slow
@pytest.mark.parametrize("role", ["admin", "support"])
def test_api_conforms_to_its_openapi_document(fuzz_app: dict[str, Any], role: str) -> None:
    """With the admin key and with a team key (support), schema-valid and schema-invalid
    generated requests to every operation get no 5xx, and every response matches the
    OpenAPI document (status code, content type, headers, body schema)."""
    loaded = _configure(fuzz_app["schema"])
    auth = fuzz_app["headers"][role]
    who = "admin" if role == "admin" else "team"
    failures: list[str] = []
    for result in loaded.get_all_operations():
        operation = result.ok()
        name = f"{operation.method.upper()} {operation.path}"
        for mode, strategy in _modes(operation, fuzz_app["customers"][0]):

            @given(case=strategy)
            @settings(
                max_examples=EXAMPLES[mode],
                deadline=None,
                suppress_health_check=list(HealthCheck),
                database=None,
                derandomize=True,
            )
            def run(case: Any) -> None:
                response = case.call_and_validate(headers=auth)
                FIGURES[who] += 1
                FIGURES[f"{response.status_code // 100}xx"] += 1

            try:
                run()
            except Unsatisfiable:
                # Negative mode on an operation with no parameters and no body: there is
                # nothing to make invalid.
                assert mode == "negative"
            except (Exception, BaseExceptionGroup) as exc:  # FailureGroup: report all
                failures.append(f"{name} ({mode}): {str(exc)[:1500]}")
            OPERATIONS[who].add(name)
    assert not failures, "\n\n".join(failures)
