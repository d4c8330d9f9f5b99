"""``/v2/health/ready`` means "at least one model can answer", asked live of the repository:
unloading the last model through the repository API takes the pod out of rotation, loading one
back puts it in again."""

from __future__ import annotations

from tests.server.test_repository import MODEL, versions  # noqa: F401 (fixture)
from tests.server.test_repository_api import OTHER, PNG, serve_repo, two_models  # noqa: F401


def test_unloading_the_last_model_makes_the_server_not_ready(two_models):  # noqa: F811
    with serve_repo(two_models) as client:
        codes = [client.get("/v2/health/ready").status_code]
        client.post(f"/v2/repository/models/{OTHER}/unload")
        codes.append(client.get("/v2/health/ready").status_code)  # MODEL still answers
        client.post(f"/v2/repository/models/{MODEL}/unload")
        last = client.get("/v2/health/ready")
        predict = client.post(f"/v1/models/{MODEL}:predict", **PNG).status_code
        live = client.get("/v2/health/live").status_code
        client.post(f"/v2/repository/models/{MODEL}/load")
        again = client.get("/v2/health/ready").status_code
    assert codes == [200, 200]
    assert (last.status_code, last.json(), predict) == (503, {"ready": False}, 404)
    assert live == 200  # not ready is not dead: the orchestrator must not restart the pod
    assert again == 200
