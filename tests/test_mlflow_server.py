"""The smoke study as users browse it: read back through the REST API of a real `mlflow
server` on its store (what the MLflow UI reads), not the Python client on the database.

The experiment opens on its runs (kind tag), each trial run is named by its candidate and
nested under the study's parent run, a trial's parameters are what it varies, the answers
are an MLflow table, and the registered champion loads through `mlflow.pyfunc` from the
server and generates text.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(smoke_study, smoke_home):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(smoke_home / "mlflow_server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{smoke_home / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, "MLFLOW_TRACKING_URI": ""}, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None, (smoke_home / "mlflow_server.log").read_text()
            assert time.time() < deadline, "mlflow server did not start in 120 s"
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _get(url: str, endpoint: str, **query) -> dict:
    with urllib.request.urlopen(f"{url}{endpoint}?{urllib.parse.urlencode(query)}",
                                timeout=30) as reply:
        return json.loads(reply.read())


def _post(url: str, endpoint: str, body: dict) -> dict:
    request = urllib.request.Request(f"{url}{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


def _tags(entity: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in entity.get("tags", [])}


def _runs(url: str, experiment_id: str, role: str) -> list[dict]:
    found = _post(url, "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [experiment_id], "max_results": 500,
        "filter": f"tags.`soups.role` = '{role}'"})
    return found.get("runs", [])


def test_the_experiment_opens_on_named_nested_trials(server):
    from soups.names import candidate_label
    from study.mlflow_links import runs_table_url

    experiment = _get(server, "/api/2.0/mlflow/experiments/get-by-name",
                      experiment_name="smoke")["experiment"]
    tags = _tags(experiment)
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["mlflow.experiment.primaryMetric.name"] == "objective"
    experiment_id = experiment["experiment_id"]
    (parent,) = _runs(server, experiment_id, "parent")
    parent_params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    assert any(key.startswith("task.math_code.") for key in parent_params)
    trials = _runs(server, experiment_id, "trial")
    assert len(trials) == 17
    for run in trials:
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        run_tags = _tags(run["data"])
        assert run_tags["mlflow.parentRunId"] == parent["info"]["run_id"]
        assert run_tags["mlflow.source.name"] == "soups" and "mlflow.source.git.commit" in \
            run_tags
        assert {"method", "seed"} <= set(params) and len(params) <= 6, params
        assert ("rank" in params) == (params["method"] != "base")
        varied = {k: v for k, v in params.items() if k not in ("method", "rank", "seed")}
        assert run["info"]["run_name"] == candidate_label(params["method"],
                                                          params.get("rank"), varied)
    # The link `soups run` and the report print opens the study's shared view (an
    # experiment tag the UI reads): the trials, best objective first, with its columns.
    link = urllib.parse.urlparse(runs_table_url(server, experiment_id))
    (key,) = urllib.parse.parse_qs(link.fragment.split("?", 1)[1])["viewStateShareKey"]
    state = json.loads(tags[f"mlflow.sharedViewState.{key}"])
    assert state["orderByKey"] == "metrics.`objective`" and state["orderByAsc"] is False
    assert {"metrics.`objective`", "params.`method`", "params.`rank`", "params.`seed`",
            "metrics.`validation/math_code/parsed`"} <= set(state["selectedColumns"])
    searched = _post(server, "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [experiment_id], "filter": state["searchFilter"],
        "order_by": ["metrics.`objective` DESC"], "max_results": 500})["runs"]
    objectives = [{m["key"]: m["value"] for m in r["data"]["metrics"]}["objective"]
                  for r in searched]
    assert len(searched) == 17 and objectives == sorted(objectives, reverse=True)
    with urllib.request.urlopen(server + "/", timeout=30) as page:  # the UI itself
        assert page.status == 200 and b"<html" in page.read().lower()


def test_generations_are_a_table_with_a_parse_rate(server):
    experiment_id = _get(server, "/api/2.0/mlflow/experiments/get-by-name",
                         experiment_name="smoke")["experiment"]["experiment_id"]
    run = _runs(server, experiment_id, "trial")[0]
    run_id = run["info"]["run_id"]
    listed = _get(server, "/api/2.0/mlflow/artifacts/list", run_id=run_id,
                  path="generations/validation")
    names = {f["path"] for f in listed["files"]}
    assert "generations/validation/math_code.table.json" in names
    logged = json.loads(_tags(run["data"])["mlflow.loggedArtifacts"])
    assert {"path": "generations/validation/math_code.table.json", "type": "table"} in logged
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert 0.0 <= metrics["validation/math_code/parsed"] <= 1.0


def test_the_champion_loads_from_the_server_and_generates(server, smoke_home):
    import mlflow

    rows = json.loads((smoke_home / "smoke" / "leaderboard.json").read_text())
    if rows[0]["method"] == "base":
        pytest.skip("the base model won the smoke study: nothing was registered")
    saved = mlflow.get_tracking_uri()
    try:
        mlflow.set_tracking_uri(server)
        version = mlflow.MlflowClient().get_model_version_by_alias("smoke-champion",
                                                                    "champion")
        assert version.description.startswith("Champion of study smoke")
        assert version.tags["method"] == rows[0]["method"]
        model = mlflow.pyfunc.load_model("models:/smoke-champion@champion")
        answers = model.predict(["What is 3 plus 4?", "Write a Python function solution()."])
    finally:
        mlflow.set_tracking_uri(saved)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert any(a.strip() for a in answers)
