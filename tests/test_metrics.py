"""/metrics: Prometheus text from a real server, counting real runs."""

from __future__ import annotations

from conftest import LiveServer
from http_client import call, post
from prometheus_client.parser import text_string_to_metric_families


def scrape(server: LiveServer) -> dict[str, list]:
    r = call("GET", server.url + "/metrics")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(r.body.decode())}


def value(samples: list, **labels: str) -> float:
    return sum(s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_count_runs_by_status_and_language(live_server: LiveServer) -> None:
    before = scrape(live_server)
    ok = post(live_server.api + "/submissions?wait=true", {"source_code": "print(1)", "language_id": 71})
    bad = post(live_server.api + "/submissions?wait=true", {"source_code": "raise SystemExit(3)", "language_id": 71})
    assert (ok.json["status"]["id"], bad.json["status"]["id"]) == (3, 11)
    after = scrape(live_server)

    runs_before, runs_after = before.get("runflare_runs", []), after["runflare_runs"]
    for status in ("Accepted", "Runtime Error (NZEC)"):
        grown = value(runs_after, status=status, language="71") - value(runs_before, status=status, language="71")
        assert grown >= 1, status
    durations = after["runflare_run_duration_seconds"]
    assert value(durations, kind="program") >= 2  # the histogram's _count and _sum are both > 0
    assert "runflare_queue_depth" in after and value(after["runflare_queue_depth"]) >= 0
    assert value(after["runflare_pool_kernels"], pool="program", state="total") >= 1
    assert "runflare_websockets_open" in after and "runflare_sandbox_failures" in after
    starts = after["runflare_kernel_start_seconds"]
    assert value([s for s in starts if s.name.endswith("_count")], pool="python3") >= 1
    targets = after["runflare_pool_target"]
    low, now, high = (value(targets, pool="python3", bound=b) for b in ("min", "current", "max"))
    assert 0 <= low <= now <= high and high >= 1


def test_metrics_behind_the_auth_token(tmp_path) -> None:
    from conftest import start_server

    server = start_server(tmp_path, "--auth-token", "sekrit")
    try:
        assert call("GET", server.url + "/metrics").status == 401
        r = call("GET", server.url + "/metrics", headers={"X-Auth-Token": "sekrit"})
        assert r.status == 200 and b"runflare_queue_depth" in r.body
    finally:
        server.stop()
