"""The scoring worker end to end beside pgqueuer running no-op jobs, on the same PostgreSQL, in one run.

Two figures per queue, both read from the database clock (enqueue `created_at` to result `scored_at`):
- throughput: N jobs enqueued in bulk while the consumers run; N / (last result - first enqueue);
- latency: single-row INSERTs at a fixed 200 jobs/s; p50/p99 of enqueue-to-result.
The worker scores with a real LightGBM model (60 features, 300 trees of 15 leaves: the serving
benchmark's) from the BentoML model store and looks users up in user_features_latest. pgqueuer runs
no-op jobs, so the ratio shows what the queue plumbing costs versus the scoring itself.
Scale: BENCH_WORKER_JOBS (default 50000), BENCH_WORKER_RATE_SECONDS (default 15).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

N_USERS = 10_000
N_USER_FEATURES = 58
RATE = 200
PROCESSES = 2  # one per core
ROOT = Path(__file__).resolve().parent.parent


# ---- shared plumbing ---------------------------------------------------------------------------


@contextmanager
def bench_database(server_url: str) -> Iterator[str]:
    """A fresh database on the server, dropped afterwards."""
    import psycopg

    name = f"bench_worker_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{server_url.rpartition('/')[0]}/{name}"
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def paced(rate: int, seconds: float) -> Iterator[int]:
    """Yield i at t0 + i/rate (a fixed arrival rate, not a closed loop)."""
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        yield i


def wait_for(check: Any, timeout: float, what: str) -> None:
    """Poll until check() is true."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout}s for {what}")
        time.sleep(0.05)


def count(conn: psycopg.Connection[Any], sql: str) -> int:
    """The answer of a count(*) query (an aggregate without GROUP BY returns exactly one row)."""
    row = conn.execute(sql).fetchone()
    assert row is not None, sql
    return int(row[0])


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM and reap."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class CpuMeter:
    """CPU seconds spent by the consumer processes and by this database's PostgreSQL backends.

    The machine is shared, so wall-clock rates swing with other load; CPU per job does not, and
    2 cores / (CPU per job) is what two idle cores could sustain.
    """

    def __init__(self, url: str, pids: list[int]) -> None:
        self.url, self.pids = url, pids
        self._start: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_loop, daemon=True)

    def __enter__(self) -> CpuMeter:
        """Take the first snapshot and start sampling."""
        from worker.queue import connect

        self._conn = connect(self.url)
        self._start = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join()
        self._sample()
        self._conn.close()

    def _backends(self) -> list[int]:
        """PIDs of the server processes serving this database (including short-lived ones)."""
        rows = self._conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
        return [int(r[0]) for r in rows]

    def _sample(self) -> dict[int, float]:
        """Record every process's cumulative CPU seconds."""
        seen = {}
        for pid in [*self.pids, *self._backends()]:
            cpu = process_cpu_seconds(pid)
            if cpu is not None:
                seen[pid] = self._last[pid] = cpu
        return seen

    def _sample_loop(self) -> None:
        """Sample often enough to catch backends that come and go."""
        while not self._stop.wait(0.2):
            self._sample()

    def totals(self) -> dict[str, float]:
        """CPU seconds of the consumers and of the database backends over the measured span."""
        spent = {pid: cpu - self._start.get(pid, 0.0) for pid, cpu in self._last.items()}
        consumers = sum(v for pid, v in spent.items() if pid in self.pids)
        return {"consumer_cpu_s": consumers, "postgres_cpu_s": sum(spent.values()) - consumers}


def process_cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of a live process (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_cpu(figures: dict[str, Any], cpu: dict[str, float], jobs: float) -> dict[str, Any]:
    """Add CPU per job and what two idle cores could sustain at that cost."""
    per_job = (cpu["consumer_cpu_s"] + cpu["postgres_cpu_s"]) / jobs
    return figures | {
        "consumer_cpu_us_per_job": cpu["consumer_cpu_s"] / jobs * 1e6,
        "postgres_cpu_us_per_job": cpu["postgres_cpu_s"] / jobs * 1e6,
        "two_core_capacity_per_s": 2 / per_job,
    }


# ---- the worker ------------------------------------------------------------------------------


def feature_names() -> list[str]:
    """Model features: the request's two, then the user features."""
    return ["request_amount_jpy", "request_fee_jpy"] + [
        f"user_feature_{i:02d}" for i in range(N_USER_FEATURES)
    ]


def setup_worker_side(url: str, store: Path) -> float:
    """user_features_latest for N_USERS users and paylater-default:1 in the model store; returns decline share."""
    import lightgbm as lgb
    import numpy as np

    from paylater.product import fee_for
    from worker.queue import connect, ensure_schema

    rng = np.random.default_rng(11)
    names = feature_names()
    users = rng.normal(size=(N_USERS, N_USER_FEATURES))
    n = 20_000
    amount = rng.integers(1_000, 100_001, n)
    x = np.column_stack(
        [amount, [fee_for(int(a)) for a in amount], users[rng.integers(0, N_USERS, n)]]
    ).astype(float)
    logit = -2.2 + amount / 60_000 + x[:, 2] - 0.7 * x[:, 3] + 0.5 * x[:, 4] * x[:, 5]
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    params = {"objective": "binary", "num_leaves": 15, "learning_rate": 0.05, "verbose": -1}
    booster = lgb.train(params, lgb.Dataset(x, label, feature_name=names), num_boost_round=300)
    model_file = store / "booster.txt"
    booster.save_model(str(model_file))
    save = (
        "import json, sys, bentoml, lightgbm\n"
        "b = lightgbm.Booster(model_file=sys.argv[1])\n"
        "meta = {'registry_version': '1', 'feature_names': json.loads(sys.argv[2]), 'cutoff': 0.5}\n"
        "bentoml.lightgbm.save_model('paylater-default:1', b, metadata=meta)\n"
    )
    env = {**os.environ, "BENTOML_HOME": str(store / "bentoml")}
    subprocess.run(
        [sys.executable, "-c", save, str(model_file), json.dumps(names)], env=env, check=True
    )
    with connect(url) as conn:
        ensure_schema(conn)
        columns = ", ".join(f"{f} double precision" for f in names[2:])
        conn.execute(
            f"CREATE TABLE user_features_latest (user_id bigint PRIMARY KEY, as_of date NOT NULL,"
            f" {columns}, updated_at timestamptz NOT NULL)"
        )
        with conn.cursor().copy(
            f"COPY user_features_latest (user_id, as_of, {', '.join(names[2:])}, updated_at)"
            " FROM STDIN"
        ) as copy:
            for user_id, row in enumerate(users.tolist(), start=1):
                copy.write_row([user_id, "2026-11-26", *row, "2026-11-27T00:00:00Z"])
        conn.execute("ANALYZE user_features_latest")
    sample = np.column_stack(
        [
            np.full(N_USERS, 30_000.0),
            np.full(N_USERS, float(fee_for(30_000))),
            users,
        ]
    )
    return float((np.asarray(booster.predict(sample)) >= 0.5).mean())


def start_workers(url: str, store: Path, reason_codes: str, log_dir: Path) -> list[Any]:
    """PROCESSES `paylater worker` processes (2 loops x 500 jobs each), ready to claim."""
    env = {
        **os.environ,
        "BENTOML_HOME": str(store / "bentoml"),
        "PAYLATER_WORKER_DATABASE_URL": url,
        "PAYLATER_WORKER_SHADOW_MODEL": "",
        "PAYLATER_WORKER_REASON_CODES": reason_codes,
    }
    cmd = [sys.executable, "-m", "paylater.cli", "worker", "--model", "paylater-default:1"]
    cmd += ["--concurrency", "2", "--batch-size", "500"]
    procs, logs = [], []
    for i in range(PROCESSES):
        log = log_dir / f"worker-{reason_codes}-{i}.log"
        with log.open("wb") as out:
            procs.append(
                subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
            )
        logs.append(log)
    wait_for(
        lambda: all("worker started" in log.read_text() for log in logs), 120, "workers to start"
    )
    return procs


def enqueue_bulk(url: str, n: int, chunk: int = 2_000) -> float:
    """Enqueue n jobs in multi-row INSERTs (what an app batch would do); returns seconds taken."""
    from worker.queue import connect

    started = time.perf_counter()
    with connect(url) as conn:
        for first in range(0, n, chunk):
            size = min(chunk, n - first)
            conn.execute(
                """INSERT INTO scoring_jobs (user_id, payload)
                   SELECT 1 + (g * 7919) %% %(users)s, jsonb_build_object('amount_jpy', 1000 + (g * 31) %% 99000)
                   FROM generate_series(%(first)s::int, %(last)s::int) AS g""",
                {"users": N_USERS, "first": first, "last": first + size - 1},
            )
    return time.perf_counter() - started


def enqueue_paced(url: str, seconds: float) -> int:
    """One INSERT per job at RATE jobs/s, as the app would; returns jobs sent."""
    from psycopg.types.json import Jsonb

    from worker.queue import connect, sql

    sent = 0
    with connect(url) as conn:
        for i in paced(RATE, seconds):
            # The contract's one-statement enqueue (autocommit), as an app would send it.
            params = {
                "idempotency_key": f"order-{i}",
                "user_id": 1 + (i * 7919) % N_USERS,
                "payload": Jsonb({"amount_jpy": 1_000 + (i * 31) % 99_000}),
            }
            conn.execute(sql("enqueue"), params)
            sent += 1
    return sent


def worker_figures(url: str, expected: int) -> dict[str, float]:
    """Throughput and latency percentiles from the tables, once every job is done."""
    from worker.queue import connect

    with connect(url) as conn:
        wait_for(
            lambda: count(conn, "SELECT count(*) FROM scoring_results") >= expected,
            600,
            "every job to be scored",
        )
        row = conn.execute(
            """SELECT count(*),
                      extract(epoch FROM max(r.scored_at) - min(j.created_at)),
                      percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM r.scored_at - j.created_at)),
                      percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM r.scored_at - j.created_at)),
                      count(*) FILTER (WHERE r.decision = 'decline'),
                      extract(epoch FROM max(j.created_at) - min(j.created_at))
               FROM scoring_jobs j JOIN scoring_results r ON r.job_id = j.id"""
        ).fetchone()
        assert row is not None
        bad = conn.execute("SELECT count(*) FROM scoring_jobs WHERE status <> 'done'").fetchone()
    n, span, p50, p99, declines, arrivals = (float(v) for v in row)
    return {
        "jobs": n,
        "arrival_per_s": n / arrivals if arrivals else float("inf"),
        "jobs_per_s": n / span,
        "p50_ms": p50 * 1e3,
        "p99_ms": p99 * 1e3,
        "decline_share": declines / n,
        "not_done": float(bad[0]) if bad else 0.0,
    }


def reset_worker_tables(url: str) -> None:
    """Empty the job tables between phases."""
    from worker.queue import connect

    with connect(url) as conn:
        conn.execute("TRUNCATE scoring_results, shadow_results, scoring_jobs RESTART IDENTITY")


def run_worker_phase(
    url: str, store: Path, reason_codes: str, jobs: int, seconds: float, log_dir: Path
) -> dict[str, dict[str, float]]:
    """Throughput then fixed-rate latency for one reason-code mode."""
    procs = start_workers(url, store, reason_codes, log_dir)
    pids = [p.pid for p in procs]
    try:
        reset_worker_tables(url)
        with CpuMeter(url, pids) as meter:
            enqueue_s = enqueue_bulk(url, jobs)
            throughput = worker_figures(url, jobs) | {"enqueue_per_s": jobs / enqueue_s}
        throughput = with_cpu(throughput, meter.totals(), jobs)
        reset_worker_tables(url)
        with CpuMeter(url, pids) as meter:
            sent = enqueue_paced(url, seconds)
            latency = worker_figures(url, sent)
        latency = with_cpu(latency, meter.totals(), sent)
    finally:
        stop_all(procs)
    return {"throughput": throughput, "latency": latency}


# ---- pgqueuer (the baseline) -----------------------------------------------------------------


async def _pgqueuer_consume(dsn: str, out: str, batch_size: int) -> None:
    """A pgqueuer consumer of no-op jobs recording (created, handled) times until SIGTERM."""
    import asyncpg
    from pgqueuer import PgQueuer

    conn = await asyncpg.connect(dsn)
    pgq = PgQueuer.from_asyncpg_connection(conn)
    handled: list[tuple[float, float]] = []

    @pgq.entrypoint("noop")
    async def noop(job: Any) -> None:
        handled.append((job.created.timestamp(), time.time()))

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, pgq.shutdown.set)
    Path(out + ".ready").touch()
    await pgq.run(batch_size=batch_size)
    Path(out).write_text(json.dumps(handled))


async def _pgqueuer_install(dsn: str) -> None:
    """Install pgqueuer's tables in the bench database."""
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries

    conn = await asyncpg.connect(dsn)
    await Queries(AsyncpgDriver(conn)).install()
    await conn.close()


async def _pgqueuer_enqueue_bulk(dsn: str, n: int, chunk: int = 2_000) -> float:
    """Enqueue n no-op jobs in batches; returns seconds taken."""
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries

    conn = await asyncpg.connect(dsn)
    queries = Queries(AsyncpgDriver(conn))
    started = time.perf_counter()
    for first in range(0, n, chunk):
        size = min(chunk, n - first)
        await queries.enqueue(["noop"] * size, [None] * size, [0] * size)
    took = time.perf_counter() - started
    await conn.close()
    return took


async def _pgqueuer_enqueue_paced(dsn: str, seconds: float) -> int:
    """One enqueue per job at RATE jobs/s."""
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries

    conn = await asyncpg.connect(dsn)
    queries = Queries(AsyncpgDriver(conn))
    start, sent = time.perf_counter(), 0
    for i in range(int(RATE * seconds)):
        delay = start + i / RATE - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await queries.enqueue("noop", None)
        sent += 1
    await conn.close()
    return sent


def run_pgqueuer_phase(url: str, jobs: int, seconds: float, log_dir: Path) -> dict[str, Any]:
    """pgqueuer's throughput and fixed-rate latency with PROCESSES consumers."""
    from worker.queue import connect

    asyncio.run(_pgqueuer_install(url))
    figures: dict[str, Any] = {}
    for phase in ("throughput", "latency"):
        outs = [str(log_dir / f"pgqueuer-{phase}-{i}.json") for i in range(PROCESSES)]
        cmd = [sys.executable, "-m", "bench.bench_worker", "pgqueuer-consumer", url]
        procs = [
            subprocess.Popen([*cmd, out, "100"], cwd=ROOT, stderr=subprocess.DEVNULL)
            for out in outs
        ]
        try:
            wait_for(
                lambda outs=outs: all(Path(o + ".ready").exists() for o in outs), 60, "pgqueuer"
            )
            time.sleep(1.0)  # past run()'s own start-up checks
            with CpuMeter(url, [p.pid for p in procs]) as meter:
                if phase == "throughput":
                    took = asyncio.run(_pgqueuer_enqueue_bulk(url, jobs))
                    expected = jobs
                else:
                    expected = asyncio.run(_pgqueuer_enqueue_paced(url, seconds))
                with connect(url) as conn:
                    wait_for(
                        lambda: count(conn, "SELECT count(*) FROM pgqueuer") == 0,
                        600,
                        "pgqueuer to drain",
                    )
        finally:
            stop_all(procs)
        handled = [pair for out in outs for pair in json.loads(Path(out).read_text())]
        latencies = sorted(done - created for created, done in handled)
        span = max(d for _, d in handled) - min(c for c, _ in handled)
        created = [c for c, _ in handled]
        figures[phase] = {
            "jobs": len(handled),
            "arrival_per_s": len(handled) / (max(created) - min(created)),
            "jobs_per_s": len(handled) / span,
            "p50_ms": latencies[len(latencies) // 2] * 1e3,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
        }
        figures[phase] = with_cpu(figures[phase], meter.totals(), len(handled))
        if phase == "throughput":
            figures[phase]["enqueue_per_s"] = jobs / took
        if len(handled) != expected:
            figures[phase]["note"] = f"handled {len(handled)} of {expected}"
    return figures


# ---- the run -----------------------------------------------------------------------------------


def main() -> None:
    """Run both queues on one fresh database and print figures and ratios."""
    server = os.environ.get("PAYLATER_TEST_PG_URL")
    if not server:
        raise RuntimeError(
            "PAYLATER_TEST_PG_URL is unset: `make postgres && source var/postgres.env`"
        )
    jobs = int(os.environ.get("BENCH_WORKER_JOBS", "50000"))
    seconds = float(os.environ.get("BENCH_WORKER_RATE_SECONDS", "15"))
    with tempfile.TemporaryDirectory() as tmp, bench_database(server) as url:
        store, logs = Path(tmp), Path(tmp)
        decline_share = setup_worker_side(url, store)
        print(
            f"model: {len(feature_names())} features, 300 trees x 15 leaves; {N_USERS} users; "
            f"decline share at 30,000 JPY {decline_share:.0%}; {PROCESSES} processes x 2 loops x 500",
            flush=True,
        )
        results: dict[str, Any] = {}
        for mode in ("all", "declines"):
            results[f"worker reasons={mode}"] = run_worker_phase(
                url, store, mode, jobs, seconds, logs
            )
            print(
                f"worker reasons={mode}: {json.dumps(results[f'worker reasons={mode}'])}",
                flush=True,
            )
        results["pgqueuer no-op"] = run_pgqueuer_phase(url, jobs, seconds, logs)
        print(f"pgqueuer no-op: {json.dumps(results['pgqueuer no-op'])}", flush=True)
    report(results, jobs)


def report(results: dict[str, Any], jobs: int) -> None:
    """The comparison table and ratios."""
    base = results["pgqueuer no-op"]
    load = os.getloadavg()[0]
    print(
        f"\n{jobs} jobs bulk-enqueued (throughput); {RATE} jobs/s single INSERTs (latency); "
        f"load average {load:.1f} on {os.cpu_count()} cores"
    )
    print(
        f"{'queue':24} {'jobs/s':>8} {'CPU us/job':>11} {'2-core cap/s':>13} "
        f"{'arrived/s':>10} {'p50 ms':>7} {'p99 ms':>7}"
    )
    for name, fig in results.items():
        t, lat = fig["throughput"], fig["latency"]
        cpu = t["consumer_cpu_us_per_job"] + t["postgres_cpu_us_per_job"]
        print(
            f"{name:24} {t['jobs_per_s']:8.0f} {cpu:11.0f} {t['two_core_capacity_per_s']:13.0f} "
            f"{lat['arrival_per_s']:10.0f} {lat['p50_ms']:7.1f} {lat['p99_ms']:7.1f}"
        )
    for name, fig in results.items():
        if name == "pgqueuer no-op":
            continue
        t, b = fig["throughput"], base["throughput"]
        print(
            f"{name} / pgqueuer no-op: jobs/s x{t['jobs_per_s'] / b['jobs_per_s']:.2f}, "
            f"2-core capacity x{t['two_core_capacity_per_s'] / b['two_core_capacity_per_s']:.2f}, "
            f"p99 at {RATE}/s x{fig['latency']['p99_ms'] / base['latency']['p99_ms']:.2f}"
        )
    print("goals: >= 5000 scored jobs/s on two cores, p99 <= 50 ms at 200 jobs/s")


if __name__ == "__main__":
    if sys.argv[1:2] == ["pgqueuer-consumer"]:
        asyncio.run(_pgqueuer_consume(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    else:
        main()
