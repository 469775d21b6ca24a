"""`make postman`: the merged public API as a Postman collection (v2.1), built offline from the apps'
own OpenAPI specs, so it needs no running platform."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from shared.settings import Settings

COLLECTION_SCHEMA = "https://schema.getpostman.com/json/collection/v2.1.0/collection.json"


def merged_spec(settings: Settings | None = None) -> dict[str, Any]:
    """The spec the gateway serves at /openapi.json, assembled from each service's app without starting it."""
    from fastapi.openapi.utils import get_openapi

    from services.alerting.app import create_app as alerting
    from services.analytics.app import create_app as analytics
    from services.conversion.app import create_app as conversion
    from services.gateway.api import API_DESCRIPTION
    from services.gateway.app import create_app as gateway
    from services.gateway.service import merge_specs
    from services.ingest.app import create_app as ingest
    from services.pricing.app import create_app as pricing

    settings = settings or Settings(env="development")
    gw = gateway(settings)
    own = get_openapi(title="Coinlytics API", version=gw.version, description=API_DESCRIPTION, routes=gw.routes)
    services = {
        "ingest": ingest(settings).openapi(),
        "pricing": pricing(settings).openapi(),
        "conversion": conversion(settings).openapi(),
        "analytics": analytics(settings).openapi(),
        "alerting": alerting(settings).openapi(),
    }
    return merge_specs(own, dict(services))


def _example(schema: dict[str, Any] | None, parameter: dict[str, Any]) -> str:
    for source in (parameter, schema or {}):
        if "example" in source:
            return str(source["example"])
        examples = source.get("examples")
        if isinstance(examples, list) and examples:
            return str(examples[0])
        if isinstance(examples, dict) and examples:
            first = next(iter(examples.values()))
            return str(first.get("value", "")) if isinstance(first, dict) else str(first)
    if schema and "default" in schema and schema["default"] is not None:
        return str(schema["default"])
    return ""


def _request(path: str, method: str, operation: dict[str, Any]) -> dict[str, Any]:
    query = []
    variables = []
    for parameter in operation.get("parameters", []):
        value = _example(parameter.get("schema"), parameter)
        entry = {
            "key": parameter["name"],
            "value": value,
            "description": parameter.get("description", ""),
            "disabled": not parameter.get("required", False) and not value,
        }
        if parameter.get("in") == "query":
            query.append(entry)
        elif parameter.get("in") == "path":
            variables.append({"key": parameter["name"], "value": value or f"<{parameter['name']}>"})
    postman_path = [
        f":{segment[1:-1]}" if segment.startswith("{") else segment for segment in path.strip("/").split("/")
    ]
    request: dict[str, Any] = {
        "method": method.upper(),
        "header": [],
        "url": {
            "raw": "{{baseUrl}}" + "/".join(["", *postman_path]),
            "host": ["{{baseUrl}}"],
            "path": postman_path,
            "query": query,
            "variable": variables,
        },
        "description": operation.get("description") or operation.get("summary", ""),
    }
    body = operation.get("requestBody", {}).get("content", {})
    if "application/json" in body:
        example = body["application/json"].get("example") or {}
        request["header"].append({"key": "Content-Type", "value": "application/json"})
        request["body"] = {"mode": "raw", "raw": json.dumps(example, indent=2)}
    elif "application/x-www-form-urlencoded" in body:
        props = body["application/x-www-form-urlencoded"].get("schema", {}).get("properties", {})
        request["body"] = {"mode": "urlencoded", "urlencoded": [{"key": k, "value": ""} for k in props]}
    return request


def to_collection(spec: dict[str, Any], base_url: str = "http://127.0.0.1:8000") -> dict[str, Any]:
    folders: dict[str, list[dict[str, Any]]] = {}
    for path, item in sorted(spec.get("paths", {}).items()):
        for method, operation in item.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            tag = (operation.get("tags") or ["other"])[0]
            folders.setdefault(tag, []).append(
                {
                    "name": operation.get("summary") or f"{method.upper()} {path}",
                    "request": _request(path, method, operation),
                }
            )
    return {
        "info": {
            "name": spec.get("info", {}).get("title", "Coinlytics API"),
            "description": spec.get("info", {}).get("description", ""),
            "schema": COLLECTION_SCHEMA,
        },
        "auth": {"type": "bearer", "bearer": [{"key": "token", "value": "{{accessToken}}", "type": "string"}]},
        "variable": [{"key": "baseUrl", "value": base_url}, {"key": "accessToken", "value": ""}],
        "item": [{"name": tag, "item": items} for tag, items in sorted(folders.items())],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export the Coinlytics API as a Postman collection")
    parser.add_argument("--output", default="coinlytics.postman_collection.json")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    args = parser.parse_args(argv)
    collection = to_collection(merged_spec(), args.base_url)
    Path(args.output).write_text(json.dumps(collection, indent=2))
    count = sum(len(folder["item"]) for folder in collection["item"])
    sys.stdout.write(f"wrote {count} requests to {args.output}; import it in Postman and set baseUrl/accessToken\n")


if __name__ == "__main__":
    main()
