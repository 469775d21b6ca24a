"""`make postman`: every public operation of the merged spec becomes a request in the collection."""

from __future__ import annotations

import json

from services.gateway.postman import main, merged_spec, to_collection


def test_every_public_operation_is_in_the_collection(tmp_path):
    spec = merged_spec()
    operations = {
        (method.upper(), path)
        for path, item in spec["paths"].items()
        if path.startswith("/api/v1/")
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }
    # The merged spec covers more than the gateway's own routes: services' paths are in it.
    assert ("GET", "/api/v1/prices") in operations
    assert ("GET", "/api/v1/status") in operations
    out = tmp_path / "c.json"
    main(["--output", str(out), "--base-url", "http://127.0.0.1:9999"])
    collection = json.loads(out.read_text())
    requests = {
        (r["request"]["method"], "/" + "/".join(r["request"]["url"]["path"]))
        for folder in collection["item"]
        for r in folder["item"]
    }
    expected = {(m, "/".join(f":{s[1:-1]}" if s.startswith("{") else s for s in p.split("/"))) for m, p in operations}
    assert expected <= requests
    assert {"key": "baseUrl", "value": "http://127.0.0.1:9999"} in collection["variable"]
    assert collection["info"]["schema"].endswith("/v2.1.0/collection.json")


def test_query_parameters_carry_their_examples():
    collection = to_collection(merged_spec())
    prices = next(
        r["request"]
        for folder in collection["item"]
        for r in folder["item"]
        if r["request"]["url"]["path"] == ["api", "v1", "prices"]
    )
    query = {q["key"]: q for q in prices["url"]["query"]}
    assert query["symbols"]["value"] == "BTC,ETH"
    assert query["symbols"]["disabled"] is False
