"""``qwen-edit``: serve (API + workers), worker (a worker alone), weights (model folders)."""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from server.settings import Settings

log = structlog.get_logger("qwen_edit")


def _apply_overrides(args: argparse.Namespace) -> None:
    # Flags become environment variables, so worker processes started by `serve` see them too.
    mapping = {
        "host": "HOST",
        "port": "PORT",
        "data_dir": "DATA_DIR",
        "model": "MODEL",
        "variant": "VARIANT",
        "workers": "EMBEDDED_WORKERS",
        "api_workers": "API_WORKERS",
        "device": "DEVICE",
        "database_url": "DATABASE_URL",
    }
    for attr, env in mapping.items():
        value = getattr(args, attr, None)
        if value is not None:
            os.environ[f"QWEN_EDIT_{env}"] = str(value)
    if getattr(args, "no_auth", False):
        os.environ["QWEN_EDIT_AUTH_DISABLED"] = "true"


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.api.app import create_app
    from server.jobs.db import Database
    from server.logs import configure_logging
    from server.settings import Settings
    from server.worker.ranks import resolve_auto
    from server.worker.supervisor import WorkerSupervisor

    _apply_overrides(args)
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    settings = resolve_auto(settings)  # QWEN_EDIT_PARALLEL=auto, decided once for every worker
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database.open(settings)
    db.wait_until_migrated()  # a server started before its database waits for it
    db.close()

    fatal: list[str] = []

    def on_fatal(reason: str) -> None:
        fatal.append(reason)
        log.error("stopping the server", reason=reason)
        os.kill(os.getpid(), signal.SIGTERM)

    supervisor = WorkerSupervisor(settings, on_fatal)
    supervisor.start()
    # uvicorn re-raises each SIGTERM/SIGINT it caught once it has shut down; with the default
    # handlers that kills this process before the workers are drained (they then die by
    # PDEATHSIG mid-job). The first one drains (supervisor.stop() below); any further one hands
    # the workers' jobs back to the queue now. Counted by one C call: a second signal's handler
    # can run inside the first's, between any two of its bytecodes.
    stop_requests = itertools.count()

    def on_stop_signal(signum: int, _frame: object) -> None:
        if next(stop_requests) > 0:
            supervisor.hand_back_now()
            return
        # Said at once: what follows may wait (open requests, then the jobs in hand), never in silence.
        log.info(
            "stopping",
            signal=signal.Signals(signum).name,
            open_requests_wait_s=int(settings.sync_timeout_s) + 5,
            then="workers finish the jobs in hand (each worker logs its job and step)",
            drain_s=settings.worker_drain_s,
            hint="signal again (Ctrl-C) to hand the jobs back to the queue now",
        )

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_stop_signal)
    metrics_dir = _multiprocess_env(settings)
    try:
        uvicorn.run(
            # N API processes: uvicorn spawns them on the one socket, each builds its app from the
            # environment (server/api/app.py: app_from_env); this process only supervises them.
            "server.api.app:app_from_env" if settings.api_workers > 1 else create_app(settings),
            factory=settings.api_workers > 1,
            workers=settings.api_workers if settings.api_workers > 1 else None,
            host=settings.host,
            port=settings.port,
            proxy_headers=False,  # the app's ProxyHeaders decides (it also reads X-Forwarded-Host)
            log_config=None,
            timeout_graceful_shutdown=int(settings.sync_timeout_s) + 5,
        )
    finally:
        supervisor.stop()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    if fatal:
        print(f"qwen-edit: {fatal[0]}", file=sys.stderr)
        return 1
    return 0


def _multiprocess_env(settings: Settings) -> str | None:
    """What the API processes of ``--api-workers N`` (N > 1) inherit: a fresh folder where each
    writes its Prometheus samples (prometheus_client's multiprocess mode: a scrape of any process
    sums them all; server/api/telemetry.py), and the parallel layout decided here. None for one."""
    if settings.api_workers <= 1:
        return None
    folder = tempfile.mkdtemp(prefix="qwen-edit-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    if settings.parallel is not None:
        os.environ["QWEN_EDIT_PARALLEL"] = str(settings.parallel)
    log.info("api processes", count=settings.api_workers, metrics_dir=folder)
    return folder


def cmd_worker(args: argparse.Namespace) -> int:
    from pipelines.loader import ModelLoadError
    from server.logs import configure_logging
    from server.settings import Settings
    from server.worker.main import run_worker
    from server.worker.supervisor import EXIT_LOAD_FAILED

    _apply_overrides(args)
    if args.workers is not None:
        return _supervise_workers(Settings(), args.workers)
    # A stand-alone worker picks its variant by slot, as the embedded ones do.
    settings = Settings().for_slot(args.slot)
    configure_logging(settings.log_level, settings.log_json)
    worker_id = settings.worker_id or f"{socket.gethostname()}/{args.slot}"
    try:
        return run_worker(settings, worker_id, ["worker", "--slot", str(args.slot)])
    except ModelLoadError as exc:
        print(f"qwen-edit worker: cannot load the model: {exc}", file=sys.stderr)
        return EXIT_LOAD_FAILED


def _supervise_workers(settings: Settings, count: int) -> int:
    """``qwen-edit worker --workers N``: N workers on this machine (one per GPU, slots 0..N-1),
    restarted if they die, drained on SIGTERM; what ``serve`` does beside its API, without the API."""
    from server.logs import configure_logging
    from server.worker.ranks import resolve_auto
    from server.worker.supervisor import WorkerSupervisor

    configure_logging(settings.log_level, settings.log_json)
    settings = resolve_auto(settings.model_copy(update={"embedded_workers": count}))
    stop = threading.Event()
    fatal: list[str] = []

    def on_fatal(reason: str) -> None:
        fatal.append(reason)
        log.error("stopping the workers", reason=reason)
        stop.set()

    supervisor = WorkerSupervisor(settings, on_fatal)
    stop_requests = itertools.count()  # one C call: see serve's handler

    def on_stop_signal(signum: int, _frame: object) -> None:
        if next(stop_requests) > 0 or stop.is_set():
            supervisor.hand_back_now()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_stop_signal)
    supervisor.start()
    while not stop.wait(1.0):
        pass
    log.info("stopping: draining workers", workers=count)
    supervisor.stop()
    if fatal:
        print(f"qwen-edit worker: {fatal[0]}", file=sys.stderr)
        return 1
    return 0


def cmd_weights_tiny(args: argparse.Namespace) -> int:
    from weights.tiny import build_tiny_model

    folder = build_tiny_model(Path(args.dir), args.variant, seed=args.seed, heads=args.heads)
    print(f"built a tiny random {args.variant!r} model in {folder}")
    return 0


def cmd_weights_tiny_safety(args: argparse.Namespace) -> int:
    from weights.tiny_safety import build_tiny_safety

    folder = build_tiny_safety(Path(args.out), args.verdict)
    print(f"built a tiny random safety classifier in {folder} (QWEN_EDIT_SAFETY_MODEL={folder})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks.client.cli import main as bench_main  # benchmarks are imported only when asked for

    return bench_main(args.bench_args)


def cmd_weights_download(args: argparse.Namespace) -> int:
    from weights.download import DownloadError, download
    from weights.hub import default_folder, resolve_repo

    repo = resolve_repo(args.repo)
    folder = Path(args.dir) if args.dir else default_folder(repo)
    try:
        download(repo, folder, revision=args.revision)
    except DownloadError as exc:
        print(f"qwen-edit weights download: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qwen-edit weights download: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"downloaded {repo} into {folder} (manifest written; `qwen-edit weights verify {folder}`)")
    return 0


def cmd_weights_verify(args: argparse.Namespace) -> int:
    from weights.hub import resolve_repo, verify

    report = verify(
        Path(args.dir), resolve_repo(args.repo) if args.repo else None, online=args.online, hashes=not args.fast
    )
    print(report.text())
    return 0 if report.ok else 1


def cmd_weights_list(args: argparse.Namespace) -> int:
    from weights.hub import list_folders

    lines = list_folders(Path(args.dir))
    print("\n".join(lines) if lines else f"no model folders under {args.dir}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """What auto would choose on a card like that, here (with what is installed), and every mode's cost."""
    import importlib.util
    import json

    from pipelines.plan import Machine, available_host_ram_gb, real_sizes, report
    from pipelines.registry import get_variant

    if args.gpu_memory_gb <= 0:
        print("qwen-edit plan: --gpu-memory-gb must be more than 0", file=sys.stderr)
        return 2
    try:
        cc = tuple(int(p) for p in args.compute_capability.split(".")) if args.compute_capability else (9, 0)
        if len(cc) != 2:
            raise ValueError
    except ValueError:
        bad = args.compute_capability
        print(f"qwen-edit plan: --compute-capability {bad!r} is not X.Y (e.g. 8.9)", file=sys.stderr)
        return 2
    machine = Machine(
        gpu_free_gb=args.gpu_memory_gb,
        compute_capability=cc,  # type: ignore[arg-type]
        host_ram_gb=args.host_ram_gb if args.host_ram_gb is not None else available_host_ram_gb(),
        torchao=importlib.util.find_spec("torchao") is not None,
    )
    if args.gpus < 1:
        print("qwen-edit plan: --gpus must be at least 1", file=sys.stderr)
        return 2
    sizes = real_sizes(get_variant(args.variant), args.model)
    result = report(machine, sizes)
    if args.gpus > 1:
        from pipelines.parallel_plan import report as parallel_report

        result["parallel"] = parallel_report(args.gpus, args.gpu_memory_gb, sizes)
    if args.json:
        print(json.dumps(result, indent=2, allow_nan=False))  # strict JSON, as every file we write
        return 0
    chosen = result["chosen"]
    print(
        f"{args.gpu_memory_gb:g} GB free, compute capability {'.'.join(map(str, cc))}, "
        f"torchao {'installed' if machine.torchao else 'not installed'}"
        + (f", {machine.host_ram_gb:.0f} GB host RAM available" if machine.host_ram_gb else "")
    )
    print(f"auto chooses: {chosen['mode']} + {chosen['quantize']} ({chosen['reason']})\n")
    print(f"{'mode':<22} {'quantize':<8} {'peak GB':>8} {'host RAM GB':>12}  verdict")
    for m in result["modes"]:
        print(f"{m['mode']:<22} {m['quantize']:<8} {m['peak_gb']:>8.1f} {m['host_ram_gb']:>12.1f}  {m['verdict']}")
    print("\nEstimates from the real architecture (meta device) at each mode's streaming granularity,")
    print("plus ~4 GB of activations at 1 MP with CFG; measure with python -m benchmarks.gpu.")
    if "parallel" in result:
        _print_parallel(result["parallel"])
    return 0


def _print_parallel(plan: dict[str, object]) -> None:
    print(f"\nParallel layouts on {plan['gpus']} GPUs (QWEN_EDIT_PARALLEL; auto would choose: {plan['chosen']})\n")
    print(f"{'layout':<18} {'GPUs':>4} {'groups':>6} {'memory mode':<21} {'GB/GPU':>7} {'speed-up':>8}  verdict")
    for row in plan["layouts"]:  # type: ignore[attr-defined]
        print(
            f"{row['layout']:<18} {row['gpus']:>4} {row['groups']:>6} {row['memory_mode']:<21} "
            f"{row['peak_gb']:>7.1f} {row['speedup']:>7.2f}x  {row['verdict']}"
        )
    print("\nPer-GPU memory: tp shards the blocks' Linear weights, ulysses/ring split the activations, cfg=2")
    print("splits neither; every rank runs the text encoder and VAE. Speed-ups are estimates (unmeasured):")
    print("python -m benchmarks.parallel measures them on a multi-GPU machine.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-edit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", help="state folder (jobs.db, files, tiny model); env QWEN_EDIT_DATA_DIR")
        p.add_argument("--database-url", help="sqlite:///… or postgresql://…; env QWEN_EDIT_DATABASE_URL")
        p.add_argument("--model", help="model folder or Hub id; env QWEN_EDIT_MODEL")
        p.add_argument("--variant", help="edit, edit-plus or edit-2511; env QWEN_EDIT_VARIANT")
        p.add_argument("--device", help="auto, cpu, cuda, cuda:1 …; env QWEN_EDIT_DEVICE")

    serve = sub.add_parser("serve", help="run the API, with worker processes beside it")
    common(serve)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, help="worker processes to start (0: API only)")
    serve.add_argument(
        "--api-workers", type=int, help="API processes on the one port (default 1); the workers still start once"
    )
    serve.add_argument("--no-auth", action="store_true", help="accept requests without an API key (local use)")
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run a worker (no API); --workers N: one per GPU, supervised")
    common(worker)
    worker.add_argument("--slot", type=int, default=0, help="this machine's worker number (its stable id)")
    worker.add_argument(
        "--workers",
        type=int,
        choices=range(1, 65),
        metavar="N",
        help="run N supervised workers (slots 0..N-1, one GPU each) instead of one",
    )
    worker.set_defaults(func=cmd_worker)

    weights = sub.add_parser("weights", help="model folders")
    wsub = weights.add_subparsers(dest="weights_command", required=True)
    tiny = wsub.add_parser("tiny", help="build a tiny random model folder (offline, for tests and trials)")
    tiny.add_argument("dir")
    tiny.add_argument("--variant", default="edit")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--heads", type=int, default=1, help="transformer attention heads (2+ to try ulysses=2 or tp=2 on it)"
    )
    tiny.set_defaults(func=cmd_weights_tiny)
    safety = wsub.add_parser(
        "tiny-safety", help="build a tiny random image classifier for QWEN_EDIT_SAFETY_MODEL (offline, for tests)"
    )
    safety.add_argument("out", help="folder to create")
    safety.add_argument(
        "--verdict",
        choices=["random", "nsfw", "normal"],
        default="random",
        help="pin its verdict: nsfw flags every image, normal none (default: whatever the random weights say)",
    )
    safety.set_defaults(func=cmd_weights_tiny_safety)

    bench = sub.add_parser(
        "bench",
        help="latency benchmark of v3 / OpenAI endpoints; `bench compare RUN...` (see `qwen-edit bench -h`)",
        add_help=False,
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    # --- weights download / verify / list (runtime) ---
    dl = wsub.add_parser("download", help="download a model (resumable; only what the pipeline needs)")
    dl.add_argument("repo", help="variant (edit, edit-plus, edit-2511) or Hub id")
    dl.add_argument("--dir", help="target folder (default: weights/<repo name>)")
    dl.add_argument("--revision")
    dl.set_defaults(func=cmd_weights_download)
    ver = wsub.add_parser("verify", help="check a model folder: missing or corrupt files (exit 1 if any)")
    ver.add_argument("dir")
    ver.add_argument("--repo", help="variant or Hub id to compare with (with --online)")
    ver.add_argument("--online", action="store_true", help="compare with the Hub's file list, not the manifest")
    ver.add_argument("--fast", action="store_true", help="sizes only, no sha256")
    ver.set_defaults(func=cmd_weights_verify)
    plan = sub.add_parser("plan", help="the memory plan auto would choose on a given GPU, and every mode's cost")
    plan.add_argument("--gpu-memory-gb", type=float, required=True, help="free memory of the GPU, in GB")
    plan.add_argument("--compute-capability", help="X.Y (default 9.0: Hopper); fp8 needs 8.9+")
    plan.add_argument("--host-ram-gb", type=float, help="available host RAM (default: this machine's)")
    plan.add_argument("--variant", default="edit", help="edit, edit-plus or edit-2511")
    plan.add_argument("--model", help="a model folder: its own configs (default: the variant's real ones)")
    plan.add_argument("--gpus", type=int, default=1, help="GPUs of that size: also show the parallel layouts")
    plan.add_argument("--json", action="store_true", help="machine-readable")
    plan.set_defaults(func=cmd_plan)
    from server import vendorhost

    vendorhost.add_parser(sub)
    ls = wsub.add_parser("list", help="list the model folders present")
    ls.add_argument("--dir", default="weights")
    ls.set_defaults(func=cmd_weights_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = extra + args.bench_args  # options belong to the benchmark's own parser
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
