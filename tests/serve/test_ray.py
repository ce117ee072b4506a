"""`mahir serve --ray` on a real Ray instance, driven over real HTTP: an encoder's replicas on a
local instance (answers, shutdown), an LLM's on a running cluster (streaming, a replica killed
under load)."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

import mahir
from mahir.llm_outdir import open_llm_output
from mahir.model import Model
from mahir.pooling import pool
from mahir.runtimes import reference_outputs
from mahir.serve.ray import HEALTH_CHECK_S
from tests.helpers import Server, cli
from tests.serve.test_serve import NAME, binary_output, infer_body, sentences

REPLICA = "ServeReplica:mahir:MahirReplica"  # the actor class Ray Serve names after app:deployment
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(autouse=True)
def small_ray(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Ray as a 2-core machine can carry it: no usage report, a small object store (the
    requests are small), everything on loopback; token authentication (Ray's default for
    local clusters) with a token of the test's own, not one in ~/.ray."""
    token = tmp_path / "ray-token"
    token.write_text(secrets.token_hex(32))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION", "0.01")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@dataclass
class Expected:
    """Requests with distinct inputs and what each alone must get back."""

    texts: list[str]
    embeddings: np.ndarray
    batches: list[dict[str, np.ndarray]] = field(default_factory=list)
    hidden: list[np.ndarray] = field(default_factory=list)


@pytest.fixture(scope="module")
def expected(minilm: Model, served_dir: Path) -> Expected:
    texts = sentences(minilm, 100, seed=11, max_tokens=24)
    batch = minilm.family.tokenize(texts)
    tokens = reference_outputs(minilm, [batch])[0]["last_hidden_state"]
    assert minilm.family.pooling is not None
    embeddings = pool(tokens, batch["attention_mask"], minilm.family.pooling)
    singles = [minilm.family.tokenize([t]) for t in texts]
    alone = mahir.load(served_dir)
    hidden = [alone.run(single)["last_hidden_state"] for single in singles]
    return Expected(texts, embeddings, singles, hidden)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ray", "--replicas", "2", "--autoscale", "1,4"], "not both"),
        (["--ray", "--autoscale", "4,1"], "1 <= MIN <= MAX"),
        (["--ray", "--autoscale", "0,2"], "1 <= MIN <= MAX"),
        (["--ray", "--autoscale", "four"], "give MIN,MAX"),
        (["--ray", "--replicas", "0"], ">= 1"),
        (["--address", "127.0.0.1:6379"], "add --ray"),
        (["--ray"], "serves an output directory"),
    ],
)
def test_bad_ray_options_are_one_line_and_exit_2(
    args: list[str], message: str, tmp_path: Path
) -> None:
    done = cli("serve", str(tmp_path / "not-an-output-dir"), *args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


async def embed(
    s: aiohttp.ClientSession, expected: Expected, first: int, count: int = 1
) -> tuple[int, str]:
    """Sentences first..first+count-1 in one request: (status, replica that answered); a 200
    must be right."""
    body = {"input": expected.texts[first : first + count], "model": NAME}
    async with s.post("/v1/embeddings", json=body) as response:
        status, replica = response.status, response.headers.get("x-mahir-replica", "")
        if status == 200:
            data = (await response.json())["data"]
            assert len(data) == count
            for i, item in enumerate(data, start=first):
                got = np.array(item["embedding"], np.float32)
                assert cosine(got, expected.embeddings[i]) > 0.9999, expected.texts[i]
        return status, replica


async def infer(s: aiohttp.ClientSession, expected: Expected, i: int) -> tuple[int, str]:
    binary = [{"name": "last_hidden_state", "parameters": {"binary_data": True}}]
    body = {**infer_body(expected.batches[i]), "outputs": binary}
    async with s.post(f"/v2/models/{NAME}/infer", json=body) as response:
        status, replica = response.status, response.headers.get("x-mahir-replica", "")
        if status == 200:
            headers = {k.lower(): v for k, v in response.headers.items()}
            got = binary_output(headers, await response.read())
            np.testing.assert_allclose(got, expected.hidden[i], atol=1e-4, rtol=1e-3)
        return status, replica


def client(url: str) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(total=120)
    return aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=0), timeout=timeout)


async def send_all(url: str, expected: Expected) -> list[tuple[int, str]]:
    """Every sentence to both endpoints, all at once."""
    async with client(url) as s:
        n = len(expected.texts)
        sends = [embed(s, expected, i) for i in range(n)] + [
            infer(s, expected, i) for i in range(n)
        ]
        return await asyncio.gather(*sends)


def ray_processes(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def is_replica(process: psutil.Process) -> bool:
    try:
        return REPLICA in " ".join(process.cmdline())  # Ray titles its workers ray::<actor>
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_two_local_replicas_share_concurrent_load_and_shut_down_clean(
    served_dir: Path, expected: Expected
) -> None:
    # 200 requests at once are more than one replica takes (2 x 32), so both must answer; a
    # long batching delay keeps the last eight sentences (under a batch) waiting, in flight at
    # SIGTERM.
    args = ("--ray", "--replicas", "2", "--max-delay-ms", "3000")
    server = Server(served_dir, *args)
    try:
        processes = ray_processes(server.process.pid)
        assert sum(map(is_replica, processes)) == 2
        assert any(p.name() == "raylet" for p in processes)
        answers = asyncio.run(send_all(server.url, expected))
        in_flight = asyncio.run(terminate_while_waiting(server, expected))
        code = server.process.wait(timeout=60)
    finally:
        server.stop()
    assert [status for status, _ in answers] == [200] * len(answers)
    assert len({replica for _, replica in answers}) == 2  # both replicas answered
    assert [status for status, _ in in_flight] == [200] * len(in_flight)
    assert code == 0
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert alive == [], f"left running after shutdown: {[p.name() for p in alive]}"


async def terminate_while_waiting(server: Server, expected: Expected) -> list[tuple[int, str]]:
    """Two requests of four sentences each, SIGTERM once all eight wait in the replicas'
    queues, then their answers. Four parts at once always wait for company: a lone sentence
    may start at once (the batcher stops delaying lone requests at low load), so sentences
    sent one per request could be answered before any was seen waiting."""
    async with client(server.url) as s:
        pending = [asyncio.create_task(embed(s, expected, i, 4)) for i in (0, 4)]
        depths: dict[str, float] = {}  # the last queue depth each replica reported
        deadline = time.monotonic() + 60
        while sum(depths.values()) < 8:
            assert time.monotonic() < deadline, f"queue depths {depths}, never all 8 waiting"
            assert not any(p.done() for p in pending), "answered before all 8 were seen waiting"
            # Ray routes each scrape to the replica with fewer requests in flight: a burst
            # of them reaches both, however the two requests were spread.
            for replica, depth in await asyncio.gather(*(queue_depth(s) for _ in range(10))):
                depths[replica] = depth
        server.terminate()
        return await asyncio.wait_for(asyncio.gather(*pending), 60)


async def queue_depth(s: aiohttp.ClientSession) -> tuple[str, float]:
    """(the replica that answered, its batcher's queue depth)."""
    async with s.get("/metrics") as response:
        families = text_string_to_metric_families(await response.text())
        depth = next(f.samples[0].value for f in families if f.name == "mahir_queue_depth")
        return response.headers["x-mahir-replica"], depth


@pytest.fixture
def ray_head() -> Iterator[tuple[str, str]]:
    """A one-node Ray cluster on loopback: (its address, its dashboard's state API)."""
    gcs, dashboard = free_port(), free_port()
    command = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}"]
    # The dashboard serves Ray's state API (list_actors); on loopback only.
    command += ["--include-dashboard=true", "--dashboard-host=127.0.0.1"]
    command += [f"--dashboard-port={dashboard}", "--disable-usage-stats", "--num-cpus=2"]
    command += ["--object-store-memory=100000000"]
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=180)
        yield f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120, check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def deployment_config(dashboard: str) -> dict[str, Any]:
    """The replicas' deployment settings as Ray Serve runs them (its REST API, through Ray's
    client for it, which carries the cluster's credentials)."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    details = ServeSubmissionClient(dashboard).get_serve_details()
    (application,) = details["applications"].values()
    config: dict[str, Any] = application["deployments"]["MahirReplica"]["deployment_config"]
    return config


def alive_replicas(dashboard: str) -> list[Any]:
    from ray.util.state import list_actors

    filters = [("class_name", "=", REPLICA), ("state", "=", "ALIVE")]
    return list_actors(address=dashboard, filters=filters)


@dataclass
class Answers:
    """Prompts to the tiny LLM and the greedy text its own engine gives each."""

    prompts: list[str]
    texts: list[str]


@pytest.fixture(scope="module")
def llm_answers(served_llm_dir: Path) -> Answers:
    generator, family = open_llm_output(served_llm_dir)
    prompts = [f"Count to {i}" for i in range(8)]
    texts = []
    for prompt in prompts:
        tokens = list(generator.stream(family.encode(prompt), family.sampling(12)))
        texts.append(family.decode(tokens))
    return Answers(prompts, texts)


@pytest.mark.slow
def test_llm_replicas_on_a_cluster_stream_and_a_killed_one_is_replaced(
    served_llm_dir: Path, llm_answers: Answers, ray_head: tuple[str, str]
) -> None:
    """An LLM's directory on an existing cluster (--address): a streamed chat crosses Ray's
    proxy event by event; one replica killed under load is replaced (replicas health-checked
    every `HEALTH_CHECK_S`, as Serve's own API reports) and the load goes on."""
    address, dashboard = ray_head
    args = ("--ray", "--replicas", "2", "--address", address, "--slots", "2")
    server = Server(served_llm_dir, *args)
    try:
        replicas = alive_replicas(dashboard)
        assert len(replicas) == 2
        assert deployment_config(dashboard)["health_check_period_s"] == HEALTH_CHECK_S
        llm = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        name = llm.models.list().data[0].id
        chat: list[Any] = [{"role": "user", "content": "Count to 3"}]
        asked: dict[str, Any] = {"model": name, "messages": chat, "max_tokens": 12}
        whole = llm.chat.completions.create(**asked, temperature=0)
        events = llm.chat.completions.create(**asked, temperature=0, stream=True)
        pieces = [e.choices[0].delta.content or "" for e in events if e.choices]
        assert len(pieces) > 2  # token by token, not buffered into one
        assert "".join(pieces) == whole.choices[0].message.content

        async def complete(s: aiohttp.ClientSession, i: int) -> tuple[int, str]:
            k = i % len(llm_answers.prompts)
            body = {"model": name, "prompt": llm_answers.prompts[k], "max_tokens": 12}
            async with s.post("/v1/completions", json={**body, "temperature": 0}) as response:
                status, replica = response.status, response.headers.get("x-mahir-replica", "")
                if status == 200:
                    text = (await response.json())["choices"][0]["text"]
                    assert text == llm_answers.texts[k]
                return status, replica

        loaded, after = asyncio.run(kill_one_under_load(server.url, complete, dashboard, replicas))
    finally:
        code = server.stop()
    ok = [status for status, _ in loaded].count(200)
    failed = len(loaded) - ok
    assert ok >= 0.9 * len(loaded), f"{failed} of {len(loaded)} failed during the replacement"
    assert [status for status, _ in after] == [200] * len(after)
    assert code == 0


async def kill_one_under_load(
    url: str,
    send: Callable[[aiohttp.ClientSession, int], Awaitable[tuple[int, str]]],
    dashboard: str,
    replicas: list[Any],
) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """SIGKILL one replica's process while four clients keep sending; return what the load got
    until a new replica answered, then what a batch sent after that got."""
    old = {r.actor_id for r in replicas}
    loaded: list[tuple[int, str]] = []
    fresh: set[str] = set()
    async with client(url) as s:

        async def load(offset: int) -> None:
            i = offset
            while not fresh & {replica for _, replica in loaded[-20:]}:
                loaded.append(await send(s, i))
                i += 4

        clients = [asyncio.create_task(load(k)) for k in range(4)]
        while len(loaded) < 20:  # the load is flowing
            await asyncio.sleep(0.05)
        os.kill(replicas[0].pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while not fresh:
            assert time.monotonic() < deadline, "no replica replaced the killed one in 120 s"
            now = await asyncio.to_thread(alive_replicas, dashboard)
            fresh = {r.name.rpartition("#")[2] for r in now if r.actor_id not in old}
            await asyncio.sleep(0.5)
        await asyncio.wait_for(asyncio.gather(*clients), 120)  # until the new one answered
        after = await asyncio.gather(*(send(s, i) for i in range(24)))
    return loaded, after
