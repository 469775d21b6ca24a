"""Prometheus metrics: what every service exports on /metrics, that the Grafana dashboard and the alert rules in
deploy/ query only metrics some service exports, that the scrape config matches docker-compose.yml, and that the
counters and gauges move with real traffic (a recorded Binance ticker replayed through ingest and pricing)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from services.alerting.app import create_app as alerting_app
from services.analytics.app import create_app as analytics_app
from services.conversion.app import create_app as conversion_app
from services.gateway.app import create_app as gateway_app
from services.ingest.app import create_app as ingest_app
from services.ingest.metrics import IngestMetrics
from services.ingest.rest import CcxtRestSource
from services.ingest.runner import SourceRunner
from services.pricing.app import create_app as pricing_app
from shared.settings import SERVICE_PORTS, Settings
from shared.streams import PoisonMessage, StreamConsumer, StreamMessage, StreamMetrics, StreamPublisher
from tests.conftest import eventually, make_settings, serve_app
from tests.replay import ReplayServer, Reply, serve_binance

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "coinlytics.json"
ALERT_RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
K8S_SCRAPE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus-k8s.yml"
GRAFANA_PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
COMPOSE_FILE = ROOT / "docker-compose.yml"
TICKER_PATH = "/api/v3/ticker/24hr"

# Series Prometheus makes itself for every target: no service exports them.
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# Words of PromQL that look like metric names: aggregation and binary-operator keywords (functions are
# recognised by the parenthesis that follows them).
PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "inf", "nan",
}  # fmt: skip


# --- reading metrics and PromQL ----------------------------------------------------------------------------


def exported_names(text: str) -> set[str]:
    """Every series name a /metrics page can be queried by: family names with their suffixes (a counter's
    ``_total``, a histogram's ``_bucket`` / ``_sum`` / ``_count``), also for families without samples yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        if family.type in ("histogram", "summary"):
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
    return names


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def value(text: str, name: str, **labels: str) -> float | None:
    """The sample of ``name`` whose labels include ``labels``; None when there is none."""
    found = [v for sample_labels, v in samples(text, name) if labels.items() <= sample_labels.items()]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
    return found[0] if found else None


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left once strings, label matchers, range and
    subquery brackets, grouping clauses, numbers, function names and keywords are taken out."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function call
        if word.lower() in PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def dashboard_exprs() -> list[str]:
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(json.loads(DASHBOARD.read_text(encoding="utf-8")))
    return exprs


def alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERT_RULES.read_text(encoding="utf-8"))
    return [(rule["alert"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def test_promql_metric_extraction() -> None:
    # The extractor itself: a wrong one would let the dashboard check pass vacuously.
    expr = (
        'histogram_quantile(0.95, sum by (le, route) (rate(http_request_duration_seconds_bucket{service=~"$svc",'
        'route!="/x{y}"}[$__rate_interval]))) / ignoring(le) group_left sum(rate(other_total[5m] offset 1h)) '
        "> 1e3 and on(job) up == bool 0"
    )
    assert promql_metrics(expr) == {"http_request_duration_seconds_bucket", "other_total", "up"}
    assert promql_metrics("max by (stream, group) (stream_lag_entries)") == {"stream_lag_entries"}
    assert promql_metrics("ingest_source_up == 0") == {"ingest_source_up"}


# --- the deployment files ---------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    return data


def test_scrape_config_targets_every_compose_service_on_its_port() -> None:
    config = yaml.safe_load(SCRAPE_CONFIG.read_text(encoding="utf-8"))
    services = compose()["services"]
    targets: dict[str, str] = {}
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for static in job.get("static_configs") or []:
            for target in static["targets"]:
                targets[target] = static.get("labels", {}).get("service")
    # A sharded service runs as <name>-0, <name>-1, ... (docs/scaling.md): each is scraped on its own.
    instances = {
        name: [host for host in services if host == name or re.fullmatch(rf"{name}-\d+", host)]
        for name in SERVICE_PORTS
    }
    expected = {f"{host}:{port}": name for name, port in SERVICE_PORTS.items() for host in instances[name]}
    assert targets == expected
    for target, name in targets.items():
        host, port = target.split(":")
        assert host in services, f"{target}: no compose service {host}"
        env = services[host].get("environment") or {}
        url = env.get(f"COINLYTICS_{name.upper()}_URL", f"http://{name}:{SERVICE_PORTS[name]}")
        assert url.endswith(f":{port}"), f"{target}: compose runs {host} at {url}"


def test_monitoring_profile_mounts_the_deploy_files() -> None:
    services = compose()["services"]
    config = yaml.safe_load(SCRAPE_CONFIG.read_text(encoding="utf-8"))
    for name in ("prometheus", "grafana"):
        assert services[name].get("profiles") == ["monitoring"], f"{name} would start by default"
    mounts = {
        target: ROOT / source.removeprefix("./")
        for name in ("prometheus", "grafana")
        for source, target, *_ in (volume.split(":") for volume in services[name]["volumes"])
        if source.startswith("./")
    }
    for source in mounts.values():
        assert source.exists(), f"compose mounts {source}, which does not exist"
    assert mounts["/etc/prometheus/prometheus.yml"] == SCRAPE_CONFIG
    for rule_file in config["rule_files"]:
        assert mounts.get(rule_file) == ALERT_RULES, f"rule file {rule_file} is not the mounted alerts.yml"
    assert mounts["/etc/grafana/provisioning"] == GRAFANA_PROVISIONING
    providers = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "coinlytics.yml").read_text())["providers"]
    assert [mounts.get(p["options"]["path"]) for p in providers] == [DASHBOARD.parent]
    sources = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    prometheus_port = services["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert [s["url"] for s in sources] == [f"http://prometheus:{prometheus_port}"]
    # The dashboard's default data source is the provisioned one.
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == sources[0]["uid"]


def test_k8s_scrape_config_follows_the_pod_annotations() -> None:
    config = yaml.safe_load(K8S_SCRAPE_CONFIG.read_text(encoding="utf-8"))
    relabels = config["scrape_configs"][0]["relabel_configs"]
    keep = [r for r in relabels if r.get("action") == "keep"]
    assert keep and keep[0]["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
    for name, port in SERVICE_PORTS.items():
        docs = yaml.safe_load_all((ROOT / "deploy" / "k8s" / f"{name}.yaml").read_text(encoding="utf-8"))
        # Pricing (and any sharded service) is a StatefulSet (docs/scaling.md).
        deployment = next(d for d in docs if d and d["kind"] in ("Deployment", "StatefulSet"))
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(port),
            "prometheus.io/path": "/metrics",
        }, name


# --- the running platform ---------------------------------------------------------------------------------


@pytest.fixture
async def platform(
    exchange_fixtures: Path, replay: ReplayServer, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[dict[str, str]]:
    """All six services in this process on real local servers, ingest polling the replayed Binance ticker."""
    serve_binance(replay, exchange_fixtures)
    monkeypatch.setenv("COINLYTICS_SOURCE_BINANCE_REST_URL", replay.base_url)
    common = make_settings(
        settings.require_database_url(), settings.require_redis_url(), settings.redis_namespace,
        sources=["binance"], coins=["BTC", "ETH"],
    )  # fmt: skip
    urls: dict[str, str] = {}
    async with contextlib.AsyncExitStack() as stack:
        for name, create in (("pricing", pricing_app), ("ingest", ingest_app), ("conversion", conversion_app),
                             ("analytics", analytics_app), ("alerting", alerting_app)):  # fmt: skip
            urls[name] = await stack.enter_async_context(serve_app(create(common)))
        upstreams = {f"{name}_url": url for name, url in urls.items()}
        urls["gateway"] = await stack.enter_async_context(serve_app(gateway_app(common.model_copy(update=upstreams))))
        yield urls


async def scrape(url: str) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


async def test_every_metric_the_dashboard_and_alerts_query_is_exported(platform: dict[str, str]) -> None:
    assert set(platform) == set(SERVICE_PORTS)
    exported: dict[str, set[str]] = {}
    for name, url in platform.items():
        exported[name] = exported_names(await scrape(url))
    everywhere = set.union(*exported.values())
    # Request metrics and the supervisor's are on every service.
    for name, names in exported.items():
        for metric in ("http_requests_total", "http_request_duration_seconds_bucket", "supervised_task_up"):
            assert metric in names, f"{name} does not export {metric}"
    queried: dict[str, set[str]] = {}
    for expr in dashboard_exprs():
        for metric in promql_metrics(expr):
            queried.setdefault(metric, set()).add(f"dashboard: {expr}")
    for alert, expr in alert_exprs():
        for metric in promql_metrics(expr):
            queried.setdefault(metric, set()).add(f"alert {alert}")
    # What the issue asks the dashboard to show; each must be queried (and so, below, exported).
    for metric in (
        "http_requests_total", "http_request_duration_seconds_bucket", "stream_lag_entries", "stream_pending_entries",
        "ingest_ticks_total", "ingest_source_up", "pricing_consolidation_seconds_bucket", "alert_evaluations_total",
        "alert_deliveries_total", "job_duration_seconds_bucket", "supervised_task_restarts_total",
        "system_log_dropped_lines_total",
    ):  # fmt: skip
        assert metric in queried, f"the dashboard and alert rules never query {metric}"
    missing = {metric: sorted(where) for metric, where in queried.items() if metric not in everywhere | PROMETHEUS_OWN}
    assert not missing, f"queried but exported by no service: {json.dumps(missing, indent=2)}"


async def test_ticks_and_stream_counters_move_with_replayed_traffic(
    platform: dict[str, str], redis: Redis, settings: Settings
) -> None:
    async def ticks_published() -> float:
        return value(await scrape(platform["ingest"]), "ingest_ticks_total", source="binance") or 0.0

    first = await eventually(ticks_published)
    # Counted after they reached the stream, so never more than the stream holds.
    assert first <= await redis.xlen(settings.key("stream", "ticks"))
    # The replay keeps serving the ticker: the next polls publish again.
    await eventually(lambda: _above(ticks_published, first))
    assert value(await scrape(platform["ingest"]), "ingest_source_up", source="binance") == 1.0

    async def acked(service: str, stream: str, group: str) -> float:
        text = await scrape(platform[service])
        return value(text, "stream_entries_processed_total", stream=stream, group=group, outcome="acked") or 0.0

    assert await eventually(lambda: acked("pricing", "ticks", "pricing")) > 0
    for service, group in (("conversion", "conversion"), ("analytics", "analytics"), ("alerting", "alerting")):
        assert await eventually(lambda s=service, g=group: acked(s, "prices", g)) > 0, group
    pricing = await scrape(platform["pricing"])
    assert value(pricing, "stream_pending_entries", stream="ticks", group="pricing") is not None
    assert (value(pricing, "pricing_consolidation_seconds_count") or 0) > 0

    async def evaluated() -> float:
        return value(await scrape(platform["alerting"]), "alert_evaluations_total") or 0.0

    assert await eventually(evaluated) > 0

    # Pricing eventually acknowledges every tick ingest has published (both counted by these metrics).
    async def caught_up() -> bool:
        published = await ticks_published()
        return await acked("pricing", "ticks", "pricing") >= published > first

    await eventually(caught_up)


async def _above(read: Any, floor: float) -> bool:
    current: float = await read()
    return current > floor


async def test_route_label_is_the_template_not_the_path(platform: dict[str, str]) -> None:
    async with httpx.AsyncClient(base_url=platform["pricing"]) as client:
        for symbol in ("BTC", "ETH", "NOSUCHCOIN"):
            response = await client.get(f"/api/v1/prices/{symbol}/sources", params={"vs": "USD"})
            assert response.status_code in (200, 404), response.text
        for path in ("/no/such/page/123", "/no/such/page/456"):
            assert (await client.get(path)).status_code == 404
    text = await scrape(platform["pricing"])
    routes = {labels["route"] for labels, _ in samples(text, "http_requests_total")}
    assert "/api/v1/prices/{symbol}/sources" in routes
    assert "unmatched" in routes
    assert not [r for r in routes if "BTC" in r or "ETH" in r or "NOSUCHCOIN" in r or "/no/such" in r], routes
    total = sum(
        v
        for labels, v in samples(text, "http_requests_total")
        if labels["route"] == "/api/v1/prices/{symbol}/sources" and labels["method"] == "GET"
    )
    assert total == 3
    assert value(text, "http_request_duration_seconds_count", method="GET", route="/api/v1/prices/{symbol}/sources")


async def test_the_gateway_labels_forwarded_requests_with_the_route_that_answered(platform: dict[str, str]) -> None:
    async with httpx.AsyncClient(base_url=platform["gateway"], timeout=10) as client:
        for symbol in ("BTC", "ETH"):
            response = await client.get(f"/api/v1/prices/{symbol}/sources", params={"vs": "USD"})
            assert response.status_code in (200, 404), response.text
            # The service's template is for the gateway's labels, not for the caller.
            assert "x-coinlytics-route" not in response.headers
        # Nor does the gateway name its own routes.
        assert "x-coinlytics-route" not in (await client.get("/api/v1/status")).headers
        assert (await client.get("/api/v1/no-such-thing/1")).status_code == 404
    routes = {labels["route"] for labels, _ in samples(await scrape(platform["gateway"]), "http_requests_total")}
    assert "/api/v1/prices/{symbol}/sources" in routes, routes
    assert "/api/v1/{path:path}" not in routes
    assert not [r for r in routes if "BTC" in r or "ETH" in r or "no-such" in r], routes


# --- a consumer's metrics and lifecycle events, one entry at a time ---------------------------------------


async def test_consumer_counts_outcomes_and_reports_pending_and_lag(redis: Redis, settings: Settings) -> None:
    registry = CollectorRegistry()
    metrics = StreamMetrics(registry)
    publisher = StreamPublisher(redis, namespace=settings.redis_namespace, maxlen=1000)

    async def handle(message: StreamMessage) -> None:
        kind = message.payload()["kind"]
        if kind == "poison":
            raise PoisonMessage("cannot be processed")
        if kind == "broken":
            raise RuntimeError("handler failed")

    consumer = StreamConsumer(
        redis, namespace=settings.redis_namespace, stream="metrics-test", group="testers", consumer="one",
        handle_one=handle, block_ms=50, claim_idle_ms=600_000, metrics=metrics, metrics_interval=0.0,
    )  # fmt: skip
    await consumer.ensure_group()
    for kind in ("good", "good", "broken", "poison", "good"):
        await publisher.publish("metrics-test", {"kind": kind})

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"stream": "metrics-test", "group": "testers", **labels})

    await consumer.refresh_metrics(force=True)
    assert sample("stream_lag_entries") == 5
    assert sample("stream_pending_entries") == 0

    stop = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(consumer.run(stop))

        async def settled() -> bool:
            return sample("stream_pending_entries") == 1 and sample("stream_lag_entries") == 0

        await eventually(settled)
        stop.set()
        await asyncio.wait_for(task, timeout=10)
    assert sample("stream_entries_processed_total", outcome="acked") == 3
    assert sample("stream_entries_processed_total", outcome="failed") == 1
    assert sample("stream_entries_processed_total", outcome="dead_lettered") == 1
    events = [e for e in logs if e["event"].startswith("consumer_")]
    started = [e for e in events if e["event"] == "consumer_started"]
    stopped = [e for e in events if e["event"] == "consumer_stopped"]
    dead = [e for e in events if e["event"] == "consumer_dead_lettered"]
    assert len(started) == len(stopped) == len(dead) == 1
    for event in (*started, *stopped):
        assert (event["group"], event["consumer"]) == ("testers", "one")
        assert event["stream"].endswith(":stream:metrics-test")
    assert dead[0]["group"] == "testers" and dead[0]["reason"] == "cannot be processed"


# --- a source's link events and gauge --------------------------------------------------------------------


async def test_rest_source_logs_connected_disconnected_and_errors(
    replay: ReplayServer, exchange_fixtures: Path, redis: Redis, sessions: Any, settings: Settings
) -> None:
    serve_binance(replay, exchange_fixtures)
    registry = CollectorRegistry()
    runner = SourceRunner(
        CcxtRestSource("binance", rest_url=replay.base_url, timeout_seconds=5),
        settings=settings,
        redis=redis,
        publisher=StreamPublisher(redis, namespace=settings.redis_namespace, maxlen=settings.stream_maxlen),
        sessions=sessions,
        metrics=IngestMetrics(registry),
    )
    runner.set_coins(["BTC", "ETH"])

    def up() -> float | None:
        return registry.get_sample_value("ingest_source_up", {"source": "binance"})

    def ticks() -> float:
        return registry.get_sample_value("ingest_ticks_total", {"source": "binance"}) or 0.0

    assert up() == 0
    failure = Reply(body=b'{"code":-1001,"msg":"Internal error"}', status=503)
    try:
        with structlog.testing.capture_logs() as logs:
            await runner.run_once()
            assert up() == 1
            published = ticks()
            await runner.run_once()  # still delivering: no second "connected"
            replay.fail_next(TICKER_PATH, failure, times=2)
            await runner.run_once()
            assert up() == 0
            await runner.run_once()
            await runner.run_once()
            assert up() == 1
    finally:
        await runner.source.close()
    stream_length = await redis.xlen(settings.key("stream", "ticks"))
    assert published > 0 and ticks() == stream_length == 3 * published
    link = [e for e in logs if e["event"] in ("source_connected", "source_disconnected", "source_error")]
    assert [e["event"] for e in link] == ["source_connected", "source_disconnected", "source_error", "source_connected"]
    assert all(e["source"] == "binance" and e["kind"] == "rest" for e in link)
    assert all(e["reason"] for e in link[1:3])
    assert link[1]["error_kind"] == "unavailable"


# --- alerts: evaluations, fired, deliveries by outcome -----------------------------------------------------


async def test_alert_metrics_and_events_follow_a_delivery_that_retries_then_succeeds(
    settings: Settings, db: Any, redis: Redis
) -> None:
    # The alerting platform of tests/test_alert_delivery.py: real service, gateway and webhook receiver.
    from tests.test_alert_delivery import Receiver, coins, create_alert, running_platform, settled_events, user

    await coins(db)
    receiver = Receiver(status=503)
    await receiver.start()
    try:
        with structlog.testing.capture_logs() as logs:
            async with running_platform(settings, db, redis) as platform:
                # The running alerting app itself (its lifespan is up under the platform's server).
                transport = httpx.ASGITransport(app=platform.alerting)
                async with httpx.AsyncClient(transport=transport, base_url="http://alerting") as client:
                    headers = await user(platform.client, "metrics@example.com")
                    created = await create_alert(platform, headers, channels=[{"type": "webhook", "url": receiver.url}])
                    await platform.price("99")
                    await platform.price("101")  # crosses 100: fires once

                    async def deliveries(outcome: str) -> float:
                        text = (await client.get("/metrics")).text
                        return value(text, "alert_deliveries_total", channel="webhook", outcome=outcome) or 0.0

                    await eventually(lambda: deliveries("retrying"))
                    receiver.status = 200
                    await settled_events(platform, headers, created["id"], status="delivered")
                    await eventually(lambda: deliveries("delivered"))
                    text = (await client.get("/metrics")).text
    finally:
        await receiver.stop()
    assert value(text, "alert_fired_total") == 1
    assert (value(text, "alert_evaluations_total") or 0) >= 2
    assert value(text, "alert_deliveries_total", channel="webhook", outcome="delivered") == 1
    retried = value(text, "alert_deliveries_total", channel="webhook", outcome="retrying") or 0
    assert retried == len(receiver.received) - 1 >= 1
    fired = [e for e in logs if e["event"] == "alert_fired"]
    assert len(fired) == 1
    assert {k: fired[0][k] for k in ("alert_id", "symbol", "vs", "condition")} == {
        "alert_id": created["id"], "symbol": "BTC", "vs": "USD", "condition": "above",
    }  # fmt: skip
    delivered = [e for e in logs if e["event"] == "alert_delivered"]
    assert [e["outcome"] for e in delivered] == ["retrying"] * int(retried) + ["delivered"]
    for event in delivered:
        assert event["event_id"] == fired[0]["event_id"] and event["alert_id"] == created["id"]
        assert event["channel"] == "webhook" and event["duration_ms"] >= 0
    assert [e["attempt"] for e in delivered] == list(range(1, len(delivered) + 1))
