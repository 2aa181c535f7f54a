"""Tile endpoint latency: p50/p95 under 8 concurrent clients on the sample slide.

Stores ``dicom_node/data/sample_slide`` in a fresh data directory, starts ``cytonode serve`` on it
(the viewer on cheroot, :class:`dicom_node.app.web.HttpServer`, own process), logs
8 clients in (each its own session cookie) and has them fetch tiles of every stored level in a
shuffled order. Baselines in the same run, under the same 8 clients: ``/healthz`` (the web stack
with no work: no session, no database, no file) and a raw ``pread`` of the same frames from the
stored files (no HTTP at all).

    .venv/bin/python bench/tiles.py [--requests 4000] [--clients 8] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests

from dicom_node.app.demo import SAMPLE_SLIDE
from dicom_node.settings import Settings
from dicom_node.store.files import Store
from tests.peers import NodeProcess

PASSWORD = "benchmark password"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summarise(latencies_s: list[float], wall_s: float) -> dict[str, float]:
    ms = [v * 1000 for v in latencies_s]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 3), "p95_ms": round(percentile(ms, 95), 3),
            "p99_ms": round(percentile(ms, 99), 3), "mean_ms": round(statistics.fmean(ms), 3),
            "max_ms": round(max(ms), 3), "per_s": round(len(ms) / wall_s, 1)}


class Client:
    """One keep-alive HTTP/1.1 connection with a logged-in session cookie (http.client: a light
    client, so that the 8 clients take little of the CPU the server needs)."""

    def __init__(self, host: str, port: int, cookie: str) -> None:
        self.connection = http.client.HTTPConnection(host, port, timeout=30)
        self.headers = {"Cookie": cookie} if cookie else {}

    def get(self, path: str) -> tuple[int, str | None, bytes]:
        self.connection.request("GET", path, headers=self.headers)
        rsp = self.connection.getresponse()
        body = rsp.read()
        return rsp.status, rsp.getheader("X-Tile-Source"), body


def run_clients(paths: list[str], clients: list[Client], check: str | None) -> dict[str, float]:
    """Each client takes the next path from the shared list; returns latency statistics."""
    lock = threading.Lock()
    position = [0]
    latencies: list[float] = []
    errors: list[str] = []

    def work(client: Client) -> None:
        mine: list[float] = []
        while True:
            with lock:
                if position[0] >= len(paths):
                    break
                path = paths[position[0]]
                position[0] += 1
            started = time.perf_counter()
            status, source, body = client.get(path)
            mine.append(time.perf_counter() - started)
            if status != 200 or (check and source != check) or not body:
                errors.append(f"{path}: {status} {source}")
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=work, args=(c,)) for c in clients]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, first: {errors[0]}")
    return summarise(latencies, wall)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000, help="tile requests in all")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args()

    from viewer.auth import add_user
    from viewer.models import create_tables
    from viewer.slides import SlideHandle

    data_dir = Path(tempfile.mkdtemp(prefix="cytonode-bench-tiles-")) / "node"
    store = Store(Settings(data_dir=data_dir))
    create_tables(store.engine)
    files = sorted(SAMPLE_SLIDE.glob("*.dcm"))
    series = {store.ingest_file(f).series_instance_uid for f in files}
    (series_uid,) = series
    add_user(store, "bench", "technologist", PASSWORD)
    store.close()
    # The viewer as operators run it: inside `cytonode serve` (its own process; no worker).
    node = NodeProcess(data_dir, workers=0).start()
    base = f"http://127.0.0.1:{node.http_port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # the HTTP thread starts after the SCP answers
            try:
                if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)
        clients = []
        for _ in range(args.clients):
            session = requests.Session()
            token = _csrf_from_login_page(session, base)
            rsp = session.post(f"{base}/login", data={"username": "bench", "password": PASSWORD,
                                                      "csrf_token": token}, allow_redirects=False)
            if rsp.status_code != 302:
                raise RuntimeError(f"login failed: {rsp.status_code}")
            cookie = "; ".join(f"{k}={v}" for k, v in session.cookies.items())
            clients.append(Client("127.0.0.1", node.http_port, cookie))
        info = requests.get(f"{base}/api/slides/{series_uid}/info",
                            headers=clients[0].headers).json()
        tiles = []
        for k in info["stored_levels"]:
            cols = -(-info["width"] // (info["tile_size"] * 2 ** k))
            rows = -(-info["height"] // (info["tile_size"] * 2 ** k))
            tiles += [(k, c, r) for c in range(cols) for r in range(rows)]
        rng = random.Random(0)
        tile_paths = [f"/api/slides/{series_uid}/tiles/{k}/{c}_{r}.jpg"
                      for k, c, r in (rng.choice(tiles) for _ in range(args.requests))]
        # warm up: open the slide, open the connections
        run_clients(tile_paths[: args.clients * 4], clients, "stored-frame")
        healthz = run_clients(["/healthz"] * args.requests, clients, None)
        tile = run_clients(tile_paths, clients, "stored-frame")
        healthz_after = run_clients(["/healthz"] * args.requests, clients, None)
    finally:
        node.stop()
    # the floor: the same frames read straight from the stored files by 8 threads, no HTTP
    slide = SlideHandle(tuple(sorted(str(p) for p in (data_dir / "store").rglob("*.dcm"))))
    raw = _raw_reads(slide, [rng.choice(tiles) for _ in range(args.requests)], args.clients)
    slide.close()
    result = {
        "slide": {"series_instance_uid": series_uid, "width": info["width"], "height": info["height"],
                  "stored_levels": info["stored_levels"], "distinct_tiles": len(tiles)},
        "clients": args.clients, "cpu_count": os.cpu_count(),
        "tile": tile, "healthz_before": healthz, "healthz_after": healthz_after, "raw_pread": raw,
        "ratio_tile_p95_to_healthz_p95": round(
            tile["p95_ms"] / max(healthz["p95_ms"], healthz_after["p95_ms"]), 2),
        "target_p95_ms": 50, "meets_target": tile["p95_ms"] < 50,
    }
    if not args.json:
        print(f"tile endpoint, {args.clients} clients, {tile['n']} requests: p50 {tile['p50_ms']} ms, "
              f"p95 {tile['p95_ms']} ms, p99 {tile['p99_ms']} ms, {tile['per_s']} tiles/s")
        print(f"baseline /healthz: p50 {healthz['p50_ms']} / {healthz_after['p50_ms']} ms, "
              f"p95 {healthz['p95_ms']} / {healthz_after['p95_ms']} ms (before / after)")
        print(f"baseline raw pread: p50 {raw['p50_ms']} ms, p95 {raw['p95_ms']} ms")
        print(f"tile p95 / healthz p95 = {result['ratio_tile_p95_to_healthz_p95']}; "
              f"target p95 < 50 ms: {'met' if result['meets_target'] else 'NOT met'}")
    print(json.dumps(result))
    return 0


def _csrf_from_login_page(session: requests.Session, base: str) -> str:
    import re

    page = session.get(f"{base}/login").text
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    if not match:
        raise RuntimeError("no CSRF token on the login page")
    return match.group(1)


def _raw_reads(slide, tiles: list[tuple[int, int, int]], clients: int) -> dict[str, float]:
    lock = threading.Lock()
    position = [0]
    latencies: list[float] = []

    def worker() -> None:
        mine = []
        while True:
            with lock:
                if position[0] >= len(tiles):
                    break
                k, c, r = tiles[position[0]]
                position[0] += 1
            started = time.perf_counter()
            slide.frame_tables[k].read(c, r)
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarise(latencies, time.perf_counter() - started)


if __name__ == "__main__":
    sys.exit(main())
