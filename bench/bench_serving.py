"""Serving benchmark: the bento beside a Gunicorn + Flask baseline (same model, same features), one run.

Prints, with ratios: single-row /v2/score throughput and p50/p99 at 1, 16 and 64 connections (wrk),
bento worker RSS over a long run (drift per request, extrapolated to 1M), and /v2/score_batch rows/s
against in-process scoring of the same rows.
Scale with env: PAYLATER_BENCH_SECONDS (per wrk run, default 10), PAYLATER_BENCH_MEMORY_REQUESTS
(default 200000), PAYLATER_BENCH_USERS (default 10000).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypedDict

from paylater.testing import listen_port, stop_group, wait_until_answering

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
N_USER_FEATURES = 58  # + request amount and fee = the 60-feature model of the issue
CONNECTIONS = (1, 16, 64)


def _env_int(name: str, default: int) -> int:
    """An integer knob from the environment."""
    return int(os.environ.get(name, default))


def user_feature_names() -> list[str]:
    """Synthetic user feature names."""
    return [f"uf_{i:02d}" for i in range(N_USER_FEATURES)]


def train_model(rows: int = 20_000) -> Any:
    """A 60-feature binary LightGBM model (300 trees of 15 leaves) on synthetic rows."""
    import lightgbm as lgb
    import numpy as np

    from paylater.product import fee_for

    rng = np.random.default_rng(1)
    amount = rng.integers(1_000, 100_001, rows)
    fee = np.array([fee_for(int(a)) for a in amount])
    users = rng.normal(size=(rows, N_USER_FEATURES))
    logit = -2 + amount / 50_000 + users[:, :10] @ rng.normal(size=10) * 0.5
    label = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)
    x = np.column_stack([amount, fee, users])
    names = ["request_amount_jpy", "request_fee_jpy", *user_feature_names()]
    params = {"objective": "binary", "num_leaves": 15, "learning_rate": 0.05, "verbose": -1}
    return lgb.train(params, lgb.Dataset(x, label, feature_name=names), num_boost_round=300)


def register_model(booster: Any, artifacts: Path) -> str:
    """Register the model as paylater-default with the contract's tags and alias production."""
    import mlflow
    import mlflow.lightgbm
    from mlflow import MlflowClient

    experiment = mlflow.create_experiment("bench-serving", artifact_location=artifacts.as_uri())
    mlflow.set_experiment(experiment_id=experiment)
    with mlflow.start_run():
        info = mlflow.lightgbm.log_model(
            booster,
            name="model",
            pip_requirements=["lightgbm"],
            registered_model_name="paylater-default",
        )
    version = str(info.registered_model_version)
    client = MlflowClient()
    names = ["request_amount_jpy", "request_fee_jpy", *user_feature_names()]
    for key, value in {
        "feature_names": json.dumps(names),
        "cutoff": "0.3",
        "dataset_digest": "bench",
        "feature_sql_hash": "bench",
        "git_commit": "bench",
    }.items():
        client.set_model_version_tag("paylater-default", version, key, value)
    client.set_registered_model_alias("paylater-default", "production", version)
    return version


def create_features_db(server_url: str, users: int) -> str:
    """A fresh database with user_features_latest for `users` users; returns its URL."""
    import numpy as np
    import psycopg

    name = f"bench_serving_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{server_url.rpartition('/')[0]}/{name}"
    names = user_feature_names()
    values = np.random.default_rng(2).normal(size=(users, N_USER_FEATURES))
    with psycopg.connect(url, autocommit=True) as conn:
        cols = ", ".join(f"{n} double precision" for n in names)
        conn.execute(
            f"CREATE TABLE user_features_latest (user_id bigint PRIMARY KEY, as_of date NOT NULL, {cols},"
            " updated_at timestamptz NOT NULL DEFAULT now())"
        )
        with conn.cursor().copy(
            f"COPY user_features_latest (user_id, as_of, {', '.join(names)}) FROM STDIN"
        ) as copy:
            for i in range(users):
                copy.write_row([i + 1, "2026-11-26", *values[i].tolist()])
        conn.execute("ANALYZE user_features_latest")
    return url


def drop_database(server_url: str, url: str) -> None:
    """Drop the benchmark database."""
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.rpartition("/")[2]}" WITH (FORCE)')


@contextmanager
def server(
    cmd: list[str], env: dict[str, str], ready_url: str, log: Path, probe: bytes | None = None
) -> Iterator[int]:
    """Start a server in its own process group; yield its pid once ready_url answers 200 (to `probe` if given)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until_answering(ready_url, proc, log, timeout=180, probe=probe, interval=0.5)
        yield proc.pid
    finally:
        stop_group(proc)


def wrk_script(path: Path, users: int) -> Path:
    """A wrk Lua script posting single-row /v2/score requests for random users and amounts."""
    path.write_text(
        "math.randomseed(42)\n"
        "request = function()\n"
        f'  local body = string.format(\'{{"user_id": %d, "amount_jpy": %d}}\', math.random(1, {users}),'
        " math.random(1000, 100000))\n"
        '  return wrk.format("POST", "/v2/score", {["Content-Type"] = "application/json"}, body)\n'
        "end\n"
    )
    return path


def _ms(text: str) -> float:
    """A wrk duration (e.g. 1.23ms, 450.00us, 1.2s) in milliseconds."""
    m = re.match(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(text)
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


class WrkRun(TypedDict):
    """One wrk run's figures."""

    rps: float
    p50: float
    p99: float
    requests: int
    non2xx: int
    socket_errors: str
    per_worker: list[int]
    """wrk's connections each bento worker held during the run (empty when not counted)."""


def _wrk_figure(pattern: str, out: str, flags: int = 0) -> str:
    """The first group of `pattern` in wrk's report; a clear error if wrk did not print it."""
    m = re.search(pattern, out, flags)
    if m is None:
        raise ValueError(f"wrk's report has no match for {pattern!r}:\n{out}")
    return m.group(1)


def run_wrk(
    url: str, script: Path, connections: int, seconds: int, bento_pid: int | None = None
) -> WrkRun:
    """One wrk run: requests/s, p50 and p99 in ms, non-2xx answers and socket errors; with
    `bento_pid`, also how many of wrk's connections each of that bento's workers held."""
    cmd = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "--latency"]
    with subprocess.Popen(
        [*cmd, "-s", str(script), url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        per_worker = [] if bento_pid is None else settled_spread(bento_pid, url, connections)
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, out, err)
    rps = float(_wrk_figure(r"Requests/sec:\s+([\d.]+)", out))
    p50 = _ms(_wrk_figure(r"^\s+50%\s+(\S+)", out, re.M))
    p99 = _ms(_wrk_figure(r"^\s+99%\s+(\S+)", out, re.M))
    total = int(_wrk_figure(r"(\d+) requests in", out))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps,
        "p50": p50,
        "p99": p99,
        "requests": total,
        "non2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(1) if errors else "",
        "per_worker": per_worker,
    }


def bento_workers(pid: int) -> list[Any]:
    """The bento's worker processes (children running the service)."""
    import psutil

    return [
        p
        for p in psutil.Process(pid).children(recursive=True)
        if "_bentoml_impl.worker" in " ".join(p.cmdline())
    ]


def connections_per_worker(pid: int, port: int) -> list[int]:
    """How many established TCP connections to `port` each worker of the bento `pid` holds.

    BentoML's workers accept from one shared listening socket, so which worker serves a keep-alive
    connection is decided once, when it is accepted: this shows how a run's load was split."""
    import psutil

    return [
        sum(
            1
            for c in worker.net_connections(kind="tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr[1] == port
        )
        for worker in bento_workers(pid)
    ]


def settled_spread(pid: int, url: str, connections: int, wait: float = 2.0) -> list[int]:
    """connections_per_worker once all of a client's `connections` are accepted (or after `wait`
    seconds: a client still connecting gets the count so far)."""
    from urllib.parse import urlsplit

    port = urlsplit(url).port
    if port is None:
        raise ValueError(f"{url} names no port")
    deadline = time.monotonic() + wait
    while True:
        counts = connections_per_worker(pid, port)
        if sum(counts) >= connections or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


def rss_mb(procs: list[Any]) -> list[float]:
    """Resident memory of each process in MiB."""
    return [p.memory_info().rss / 2**20 for p in procs]


def post_json(url: str, payload: Any) -> Any:
    """POST JSON, return the decoded answer."""
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def batch_rows(scorer: Any, n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """n explicit-feature requests and the same n model rows."""
    import numpy as np

    rng = np.random.default_rng(3)
    names = scorer.user_feature_names
    requests = [
        {
            "amount_jpy": int(rng.integers(1_000, 100_001)),
            "features": dict(zip(names, rng.normal(size=len(names)).tolist(), strict=True)),
        }
        for _ in range(n)
    ]
    rows = [scorer.request_row(r["amount_jpy"], r["features"]) for r in requests]
    return requests, rows


def measure_batch(
    base: str, scorer: Any, batch: int = 1000, seconds: float = 10.0
) -> dict[str, float]:
    """Rows/s of /v2/score_batch (two client threads) vs in-process scoring and predict of the same rows."""
    requests, rows = batch_rows(scorer, batch)
    x = scorer.matrix(rows)
    served = post_json(f"{base}/v2/score_batch", requests)
    local = scorer.score_rows(rows)
    assert all(
        abs(a["default_probability"] - b.default_probability) < 1e-12
        for a, b in zip(served, local, strict=True)
    )
    done = [0, 0]

    body = json.dumps(requests).encode()  # encoded once: the client's cost is not the server's

    def client(i: int, until: float) -> None:
        while time.perf_counter() < until:
            req = urllib.request.Request(
                f"{base}/v2/score_batch", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=60) as r:
                r.read()
            done[i] += batch

    until = time.perf_counter() + seconds
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i, until)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    http_rps = sum(done) / (time.perf_counter() - started)

    def rate(fn: Any) -> float:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            fn()
            n += batch
        return n / (time.perf_counter() - t0)

    # Both comparators get both cores (2 threads), as the served side gets two workers.
    score_rps = rate(lambda: scorer.booster.predict(x, pred_contrib=True, num_threads=2))
    predict_rps = rate(lambda: scorer.booster.predict(x, num_threads=2))
    return {"http": http_rps, "in_process_score": score_rps, "in_process_predict": predict_rps}


def measure_memory(
    url: str, script: Path, pid: int, total: int, chunks: int = 10
) -> dict[str, Any]:
    """Worker RSS sampled after each of `chunks` wrk runs totalling about `total` requests."""
    workers = bento_workers(pid)
    samples = [(0, rss_mb(workers))]
    sent = 0
    # Calibrate the chunk length from a short run so the total lands near `total`.
    probe = run_wrk(url, script, 16, 3)
    sent += int(probe["requests"])
    samples.append((sent, rss_mb(workers)))
    chunk_seconds = max(2, int(total / chunks / max(probe["rps"], 1)))
    for _ in range(chunks):
        sent += int(run_wrk(url, script, 16, chunk_seconds)["requests"])
        samples.append((sent, rss_mb(workers)))
    # After warm-up (imports and caches settled): each worker's least-squares slope and its largest
    # departure from the first settled sample (the kernel may also trim RSS: both directions count).
    settled = samples[1:]
    xs = [float(n) for n, _ in settled]
    mean_x = sum(xs) / len(xs)
    var = sum((x - mean_x) ** 2 for x in xs) or 1.0
    slopes, spread = [], []
    for w in range(len(workers)):
        ys = [rss[w] for _, rss in settled]
        mean_y = sum(ys) / len(ys)
        slopes.append(sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var)
        spread.append(max(abs(y - ys[0]) for y in ys) / ys[0])
    return {"samples": samples, "slopes": slopes, "spread": spread, "requests": int(xs[-1] - xs[0])}


def main() -> None:
    """Run the whole serving benchmark and print figures and ratios."""
    if not shutil.which("wrk"):
        raise RuntimeError("wrk is missing: apt-get install -y wrk")
    pg_server = os.environ.get("PAYLATER_TEST_PG_URL")
    if not pg_server:
        raise RuntimeError("PAYLATER_TEST_PG_URL unset: source var/postgres.env")
    seconds = _env_int("PAYLATER_BENCH_SECONDS", 10)
    users = _env_int("PAYLATER_BENCH_USERS", 10_000)
    memory_requests = _env_int("PAYLATER_BENCH_MEMORY_REQUESTS", 200_000)
    tmp = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    env = {
        **os.environ,
        "BENTOML_HOME": str(tmp / "bentoml"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "PAYLATER_HOME": str(tmp / "home"),
        "BENTOML_DO_NOT_TRACK": "true",
    }
    os.environ.update(
        {
            k: env[k]
            for k in (
                "BENTOML_HOME",
                "MLFLOW_TRACKING_URI",
                "PAYLATER_HOME",
                "BENTOML_DO_NOT_TRACK",
            )
        }
    )
    db_url = create_features_db(pg_server, users)
    env["PAYLATER_SOURCE_URL"] = db_url
    os.environ["PAYLATER_SOURCE_URL"] = db_url
    try:
        from bentos.build import build_bento, model_tag
        from bentos.scoring import Scorer

        version = register_model(train_model(), tmp / "artifacts")
        bento = build_bento(version)
        scorer = Scorer.from_store(model_tag(version))
        script = wrk_script(tmp / "score.lua", users)
        bento_port, flask_port = listen_port(), listen_port()
        bento_cmd = [
            str(BIN / "bentoml"),
            "serve",
            bento,
            "--host",
            "127.0.0.1",
            "--port",
            str(bento_port),
        ]
        flask_cmd = [
            str(BIN / "gunicorn"),
            "-w",
            "2",
            "-b",
            f"127.0.0.1:{flask_port}",
            "--access-logfile",
            "/dev/null",
            "bench.flask_baseline:create_app()",
        ]
        flask_env = {**env, "PAYLATER_BENCH_MODEL_TAG": model_tag(version)}
        print(
            f"model: 60 features, 300 trees; {users} users in user_features_latest; {seconds} s per wrk run"
        )
        results: dict[str, dict[int, WrkRun]] = {"flask": {}, "bento": {}}
        bento_url, flask_url = f"http://127.0.0.1:{bento_port}", f"http://127.0.0.1:{flask_port}"
        with (
            server(
                flask_cmd,
                flask_env,
                f"{flask_url}/v2/score",
                tmp / "flask.log",
                probe=b'{"user_id": 1, "amount_jpy": 5000}',
            ),
            server(bento_cmd, env, f"{bento_url}/readyz", tmp / "bento.log") as bento_pid,
        ):
            for _name, url in (("flask", flask_url), ("bento", bento_url)):
                run_wrk(f"{url}/v2/score", script, 16, 2)  # warm up
            for c in CONNECTIONS:
                results["flask"][c] = run_wrk(f"{flask_url}/v2/score", script, c, seconds)
                results["bento"][c] = run_wrk(
                    f"{bento_url}/v2/score", script, c, seconds, bento_pid
                )
            print("\nsingle-row /v2/score (user_id lookup in user_features_latest), wrk -t1")
            print(
                f"{'conns':>5} | {'flask req/s':>11} {'p50 ms':>7} {'p99 ms':>7} | {'bento req/s':>11} {'p50 ms':>7} {'p99 ms':>7} | {'thrpt ratio':>11} {'p99 ratio':>9}"
            )
            for c in CONNECTIONS:
                f, b = results["flask"][c], results["bento"][c]
                print(
                    f"{c:>5} | {f['rps']:>11.0f} {f['p50']:>7.2f} {f['p99']:>7.2f} | {b['rps']:>11.0f} {b['p50']:>7.2f} {b['p99']:>7.2f} |"
                    f" {b['rps'] / f['rps']:>10.2f}x {b['p99'] / f['p99']:>8.2f}x"
                )
                # A worker holding all the connections serves them at one worker's rate.
                print(f"      bento: wrk's connections per worker {b['per_worker']}")
                for name, r in (("flask", f), ("bento", b)):
                    if r["non2xx"] or r["socket_errors"]:
                        print(
                            f"      {name}: non-2xx {r['non2xx']}, socket errors {r['socket_errors']}"
                        )
            batch = measure_batch(bento_url, scorer)
            print("\n/v2/score_batch, 1000 explicit-feature rows per call, 2 client threads")
            print(
                f"  served rows/s {batch['http']:.0f}; in-process predict with contributions (the same answer, 2 threads) {batch['in_process_score']:.0f}"
                f" -> ratio {batch['http'] / batch['in_process_score']:.2f}x"
            )
            print(
                f"  in-process probability-only predict (2 threads) {batch['in_process_predict']:.0f} -> ratio {batch['http'] / batch['in_process_predict']:.2f}x"
            )
            mem = measure_memory(f"{bento_url}/v2/score", script, bento_pid, memory_requests)
            print(
                f"\nbento worker RSS over {mem['requests']} requests after warm-up (16 connections):"
            )
            for sent, rss in mem["samples"]:
                print(f"  {sent:>9} requests: " + ", ".join(f"{r:.1f} MiB" for r in rss))
            for i, (slope, spread) in enumerate(zip(mem["slopes"], mem["spread"], strict=True)):
                print(
                    f"  worker {i}: largest change {spread * 100:.2f}% of its settled RSS; trend"
                    f" {slope * 1024 * 1000:+.3f} KB per 1k requests -> {slope * 1e6:+.1f} MiB over 1M requests"
                )
    finally:
        drop_database(pg_server, db_url)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
