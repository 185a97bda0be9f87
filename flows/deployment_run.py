"""`make deployment-run`: make sure a Prefect server, the work pool, the deployments and a worker exist,
run `prefect deployment run 'transfer-learning/local' --watch`, and stop only what this script started.

    python -m flows.deployment_run [--deployment transfer-learning/local] [--port 4200] [--param KEY=JSON ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

POOL = "local-process"


def api_healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def wait_for(api_url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if api_healthy(api_url):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode} before answering at {api_url}")
        time.sleep(0.5)
    raise TimeoutError(f"prefect server did not answer at {api_url} within {timeout:.0f}s")


def stop(proc: subprocess.Popen, name: str) -> None:
    if proc.poll() is None:
        print(f"deployment-run: stopping the {name} it started (pid {proc.pid})", flush=True)
        os.killpg(proc.pid, signal.SIGTERM)  # its own process group: the worker's flow-run children too
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def prefect_exe(env: dict) -> str:
    return shutil.which("prefect", path=env.get("PATH")) or "prefect"


def prefect(*args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([prefect_exe(env), *args], env=env, check=check)


def background(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`prefect ARGS` in its own process group (so stop() ends its children too), output appended to `log`."""
    with open(log, "ab") as out:  # Popen keeps its own copy of the descriptor
        return subprocess.Popen([prefect_exe(env), *args], env=env, start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deployment", default="transfer-learning/local")
    ap.add_argument("--port", type=int, default=4200)
    ap.add_argument("--param", action="append", default=[], help="flow parameter KEY=JSON, passed to `deployment run`")
    args = ap.parse_args()

    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.setdefault("PREFECT_API_URL", f"http://127.0.0.1:{args.port}/api")
    api_url = env["PREFECT_API_URL"]
    started: list[tuple[subprocess.Popen, str]] = []
    logs = Path(env.get("PREFECT_HOME", Path.home() / ".prefect"))
    logs.mkdir(parents=True, exist_ok=True)
    try:
        if api_healthy(api_url):
            print(f"deployment-run: using the Prefect server at {api_url}", flush=True)
        else:
            port = api_url.rsplit(":", 1)[1].split("/")[0]
            print(f"deployment-run: no server at {api_url}; starting one on 127.0.0.1:{port}", flush=True)
            server = background(["server", "start", "--host", "127.0.0.1", "--port", port], env, logs / "server.log")
            started.append((server, "server"))
            wait_for(api_url, server)
        if prefect("work-pool", "inspect", POOL, env=env, check=False).returncode != 0:
            prefect("work-pool", "create", POOL, "--type", "process", env=env)
        prefect("--no-prompt", "deploy", "--all", env=env)
        worker = background(["worker", "start", "--pool", POOL, "--type", "process"], env, logs / "worker.log")
        started.append((worker, "worker"))
        params = [f"--param={p}" for p in args.param]
        return prefect("deployment", "run", args.deployment, "--watch", *params, env=env, check=False).returncode
    finally:
        for proc, name in reversed(started):
            stop(proc, name)


if __name__ == "__main__":
    sys.exit(main())
