"""The HTTP API keeps the contract its OpenAPI schema states: schemathesis, with every check, finds nothing.

The app serves a tiny real index (``test_index.write_collection`` embedded with ``clip-tiny``, an
exact copy of one file and a zero-byte one) and is called in-process. The run is what
``schemathesis run /openapi.json --checks all`` does (examples, coverage, fuzzing and stateful
phases), with a fixed seed and few examples per operation so it takes seconds;
``schemathesis_hooks`` supplies real images for uploads and corrects two misjudgements of
multipart bodies (see there).
"""

from __future__ import annotations

import shutil

import pytest
import schemathesis
import schemathesis_hooks  # noqa: F401  (registers the image strategies and the multipart judge)
from fastapi.testclient import TestClient
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events, from_schema
from schemathesis.engine.statistic import Statistic
from test_index import image_path, make_encoder, write_collection

from vitrina.index.embed import index_folder
from vitrina.search import QUERY_PATTERN
from vitrina.serve.app import create_app
from vitrina.serve.contract import LABELS_PATTERN, parse_labels


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    base = tmp_path_factory.mktemp("contract")
    root = base / "photos"
    write_collection(root, variants=1, captions=True)  # 3 colours x 4 shapes
    shutil.copyfile(image_path(root, "red", "circle-0"), root / "red" / "circle-0-copy.png")
    (root / "blue" / "empty.png").write_bytes(b"")
    encoder = make_encoder()
    index_folder(root, encoder, base / "index", model_ref="clip-tiny", progress=False, workers=0)
    app = create_app(base / "index", encoder=encoder, thumb_dir=base / "thumbs")
    with TestClient(app):  # runs the lifespan: the workers stop at the end
        yield app


def test_schemathesis_with_every_check_finds_no_failure(app) -> None:
    config = SchemathesisConfig.from_dict({"seed": 1, "checks": {"enabled": True}, "generation": {"max-examples": 10}})
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    statistic, errors, phases = Statistic(), [], {}
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished) and event.is_test_scenario:
            statistic.on_scenario_finished(event.recorder)
        elif isinstance(event, events.PhaseFinished):
            phases[event.phase.name.value] = event.status.value
        elif isinstance(event, events.NonFatalError | events.FatalError):
            errors.append(str(event.info))
    failures = [f"{f.operation}: {f.title}: {f.message}" for f in statistic.unique_failures_map]
    assert failures == [] and errors == []
    assert phases["coverage"] == phases["fuzzing"] == "success"
    assert statistic.total_cases > 300 and len(statistic.tested_operations) == 10


def test_every_error_status_is_documented_with_the_error_model(app) -> None:
    spec = TestClient(app).get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    body = response["content"]["application/json"]["schema"]
                    assert body == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, status)
    assert spec["components"]["schemas"]["ErrorBody"]["required"] == ["error"]
    assert set(spec["paths"]["/api/search/image"]["post"]["responses"]) == {"200", "400", "413", "415", "422", "503"}


def test_a_405_names_every_method_of_the_path(app) -> None:
    client = TestClient(app)
    response = client.request("OPTIONS", "/api/search")
    assert response.status_code == 405 and response.json() == {"error": "Method Not Allowed"}
    assert response.headers["allow"] == "GET, POST"
    assert client.delete("/api/images/1").headers["allow"] == "GET"


@pytest.mark.parametrize(
    ("labels", "names"),
    [
        ("cat,dog", ["cat", "dog"]),
        (" cat , dog ,, ", ["cat", "dog"]),
        ("cat, cat", ["cat"]),  # two names, one class
        ("cat", None),
        (" , cat, ", None),
        (",".join(f"c{i}" for i in range(64)), [f"c{i}" for i in range(64)]),
        (",".join(f"c{i}" for i in range(65)), None),
    ],
)
def test_the_labels_pattern_is_what_the_server_reads(labels: str, names: list[str] | None) -> None:
    assert parse_labels(labels) == names


def test_the_schema_publishes_the_patterns_the_server_checks(app) -> None:
    spec = TestClient(app).get("/openapi.json").json()
    (q,) = [p for p in spec["paths"]["/api/search"]["get"]["parameters"] if p["name"] == "q"]
    assert q["schema"]["pattern"] == QUERY_PATTERN and q["schema"]["maxLength"] == 1000
    (explain_q,) = [p for p in spec["paths"]["/api/explain/{item_id}"]["get"]["parameters"] if p["name"] == "q"]
    assert explain_q["schema"]["pattern"] == QUERY_PATTERN and not explain_q["required"]
    form = spec["components"]["schemas"]["Body_classify_image_api_classify_post"]
    assert form["properties"]["labels"]["pattern"] == LABELS_PATTERN
    assert form["oneOf"] == [{"required": ["file"]}, {"required": ["image_id"]}]
    assert "anyOf" not in form["properties"]["image_id"]  # a multipart field is absent or a number, never null
