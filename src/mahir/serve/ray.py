"""`mahir serve --ray`: the same app, endpoints and batching, as Ray Serve replicas.

Each replica opens the output directory itself (the folder path travels, not a session: a
session does not pickle, and every replica needs its own runtime threads) and builds the app the
single-process server runs with the same `ServeConfig`: `app.build_app` for an encoder,
`llm_app.build_llm_app` for an LLM's directory, so every route, error mapping and metric is the
same. Ray Serve's proxy spreads requests over the replicas; inside each one mahir's dynamic
batcher forms the batches, or its LLM scheduler runs the engine's slots. Ray Serve (2.60,
checked in its replica code) runs an ingress app's ASGI lifespan when a replica starts and when
it stops, so the batcher starts and drains there, as under uvicorn, with nothing started by
hand. Each response names the replica that answered (`x-mahir-replica`).

Opens the output directory through `outdir.py` or `llm_outdir.py` (in the replica); never
imports passes or search.
Ray is imported inside the functions that need it: it is an optional extra (`mahir[ray]`).
"""

from __future__ import annotations

import os
import signal
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mahir.errors import BadInput, Unsupported
from mahir.serve.served import ServeConfig
from mahir.types import RuntimeOptions

APP_NAME = "mahir"
REPLICA_HEADER = b"x-mahir-replica"
REPLICA_CPUS = 0.5
"""What Ray reserves per replica, to place replicas; the runtime's threads are the output
directory's settings. Half a CPU lets two replicas, and the replacement of one that died, share
a 2-core machine; on a big node, Ray packs replicas two per core."""
HEALTH_CHECK_S = 2.0
"""How often Ray Serve checks each replica (its default is 10 s): a replica whose process died
is noticed, and its replacement started, within this long. A check is one small call a
replica."""


@dataclass(frozen=True, slots=True)
class RayConfig:
    replicas: int | None = None
    """A fixed number of replicas (1 when neither this nor `autoscale` is given)."""
    autoscale: tuple[int, int] | None = None
    """(min, max) replicas, scaled by Ray Serve on requests in flight per replica."""
    address: str | None = None
    """A running Ray cluster to join (`ray start --head` prints it); None: start a local one."""

    def __post_init__(self) -> None:
        if self.replicas is not None and self.autoscale is not None:
            raise BadInput("give --replicas N or --autoscale MIN,MAX, not both")
        if self.replicas is not None and self.replicas < 1:
            raise BadInput(f"--replicas must be >= 1, got {self.replicas}")
        if self.autoscale is not None and not 1 <= self.autoscale[0] <= self.autoscale[1]:
            low, high = self.autoscale
            raise BadInput(f"--autoscale {low},{high}: need 1 <= MIN <= MAX, e.g. 1,4")


def parse_autoscale(text: str) -> tuple[int, int]:
    """`"1,4"` -> (1, 4); anything else is a BadInput that shows the expected form."""
    parts = text.split(",")
    try:
        low, high = (int(p) for p in parts)
    except ValueError:
        raise BadInput(f"--autoscale {text!r}: give MIN,MAX replicas, e.g. 1,4") from None
    if not 1 <= low <= high:
        raise BadInput(f"--autoscale {text}: need 1 <= MIN <= MAX, e.g. 1,4")
    return low, high


class MahirReplica:
    """One replica: its own session of the output directory behind its own batcher (an LLM's:
    its own engine behind its own scheduler). Ray Serve calls `__serve_build_asgi_app__` after
    the constructor and serves what it returns."""

    def __init__(self, folder: str, config: ServeConfig) -> None:
        from mahir.serve.http import freeze_startup_heap

        self._app = _build(Path(folder), config)
        freeze_startup_heap()  # as `mahir serve` does: no full collection scans the model

    def __serve_build_asgi_app__(self) -> Any:
        from ray import serve

        return _Tagged(self._app, serve.get_replica_context().replica_tag.encode())


def _build(folder: Path, config: ServeConfig) -> Any:
    """The app `mahir serve` runs for `folder`, opened here."""
    from mahir.outdir import model_name, open_output_dir, read_manifest

    manifest = read_manifest(folder)
    if manifest.get("family") == "decoder":
        from mahir.llm_outdir import open_llm_output
        from mahir.serve.llm_app import build_llm_app

        generator, family = open_llm_output(folder, slots=config.slots)
        return build_llm_app(generator, family, model_name(manifest, folder), config)
    from mahir.serve.app import build_app

    return build_app(open_output_dir(folder, workers=config.batcher.workers), config)


class _Tagged:
    """The app, with a response header naming this replica: which replica answered is what an
    operator (and a test) needs to see that the load is spread. Plain ASGI, so the app's own
    disconnect handling and the lifespan pass through untouched."""

    def __init__(self, app: Any, tag: bytes) -> None:
        self.app, self.tag = app, tag

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def tagged_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER, self.tag)]
            await send(message)

        await self.app(scope, receive, tagged_send if scope["type"] == "http" else send)


def deployment_options(config: ServeConfig, scale: RayConfig, batch: int) -> dict[str, Any]:
    """Ray Serve's knobs from mahir's. A replica takes two batches' worth of requests at once
    (`batch`: an encoder's batch size, an LLM's slots; one batch running, one gathering or
    waiting for a free slot); the rest wait at Ray's proxy, at most `max_queue` of them (then
    503, as mahir's own queue does; Ray counts requests, mahir's queue items). Autoscaling
    aims at one full batch in flight per replica."""
    options: dict[str, Any] = {
        "max_ongoing_requests": 2 * batch,
        "max_queued_requests": config.batcher.max_queue,
        "ray_actor_options": {"num_cpus": REPLICA_CPUS},
        "health_check_period_s": HEALTH_CHECK_S,
        # Warnings and errors only, as `mahir serve` logs under uvicorn: an access-log line per
        # request, forwarded to the driver, costs more than the request on a small machine.
        "logging_config": {"log_level": "WARNING"},
    }
    if scale.autoscale is not None:
        low, high = scale.autoscale
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "target_ongoing_requests": batch,
        }
    else:
        options["num_replicas"] = scale.replicas or 1
    return options


def serve_ray(folder: Path, config: ServeConfig, scale: RayConfig) -> None:
    """Deploy `folder` on Ray Serve behind its proxy on `config.host:config.port`, block until
    SIGTERM or Ctrl-C, then shut Serve down (replicas drain their batchers) and return."""
    _keep_ray_on_loopback(scale.address)
    ray, serve = _import_ray()
    _connect(ray, scale.address)
    _stop_on_signals()
    try:
        serve.start(
            http_options={"host": config.host, "port": config.port},
            logging_config={"log_level": "WARNING"},
        )
        wrapped = serve.deployment(serve.ingress()(MahirReplica), name="MahirReplica")
        options = deployment_options(config, scale, _per_batch(folder, config))
        app = wrapped.options(**options).bind(str(folder.resolve()), config)
        serve.run(app, name=APP_NAME, route_prefix="/")
        threading.Event().wait()  # until a signal raises _Stopped
    except _Stopped:
        # The app first, while the proxy still carries answers back: its replicas finish their
        # requests in flight and drain their batchers. serve.shutdown alone stops the proxy at
        # once and drops them.
        serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()


def _per_batch(folder: Path, config: ServeConfig) -> int:
    """Requests one replica runs together: an LLM's slots (asked, else recorded), an encoder's
    batch size."""
    from mahir.outdir import read_manifest

    manifest = read_manifest(folder)
    if manifest.get("family") != "decoder":
        return config.batcher.max_batch_size
    return config.slots or RuntimeOptions.from_dict(manifest.get("options")).slots


def _import_ray() -> tuple[Any, Any]:
    try:
        with warnings.catch_warnings():
            # ray.serve's config models use pydantic-1-style Field(...) arguments; pydantic 2
            # warns about each on import. Theirs to fix, nothing for a user to act on.
            warnings.filterwarnings("ignore", message="Using extra keyword arguments on `Field`")
            import ray
            from ray import serve
    except ImportError as err:
        raise Unsupported(
            f"serving on Ray needs Ray Serve ({err}): pip install 'mahir[ray]'"
        ) from err
    return ray, serve


def _connect(ray: Any, address: str | None) -> None:
    if address is None:
        ray.init(include_dashboard=False, logging_level="warning")
        return
    try:
        ray.init(address=address, logging_level="warning")
    except ConnectionError as err:
        raise BadInput(
            f"could not join the Ray cluster at {address} ({err.__cause__ or err}): give the "
            "address `ray start --head` printed; a cluster with token authentication also "
            "needs RAY_AUTH_MODE=token here"
        ) from err


def _keep_ray_on_loopback(address: str | None) -> None:
    """Ray replaces 127.0.0.1 with this machine's routable address (other nodes must reach
    it), so a local instance would listen on the network and a head started on loopback could
    not be joined. Ray's switch for one-machine clusters keeps it on loopback; it is read when
    ray is imported, and the processes Ray starts inherit it."""
    host = "127.0.0.1" if address is None else address.rpartition(":")[0]
    if host in ("127.0.0.1", "localhost", "::1"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


class _Stopped(Exception):
    """SIGTERM or SIGINT arrived: stop serving, deploying or waiting, and shut down."""


def _stop_on_signals() -> None:
    """ray.init installs a SIGTERM handler that exits at once (and Ray's native one aborts);
    these replace them, so shutdown runs and the process exits 0, as orchestrators expect.
    Raising (not setting a flag) also ends a deploy that is still waiting for its replicas.
    A second signal, during the shutdown, ends the process at once (the default action)."""

    def stop(signum: int, frame: object) -> None:
        for other in (signal.SIGTERM, signal.SIGINT):
            signal.signal(other, signal.SIG_DFL)
        raise _Stopped(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
