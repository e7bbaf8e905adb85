"""Daemon figures: time from `inflightd serve` to READY=1 (warm and cold Numba cache), idle CPU,
RSS, and TTFT of a short chat request on an idle daemon.

    python benchmarks/daemon.py [--idle-s 60] [--config etc/inflightd.yaml]

Cold = NUMBA_CACHE_DIR pointed at an empty folder, so every kernel compiles before READY=1.
Idle CPU = the daemon's own CPU time (all threads, psutil) over --idle-s seconds of no
requests, as a share of one core. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from daemon_util import INFLIGHTD, UnixHTTPConnection  # noqa: E402


def start(tmp: Path, config: str, env_extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], str, float]:
    sock = str(tmp / "d.sock")
    notify = tmp / "n.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    env = {**os.environ, "NOTIFY_SOCKET": str(notify), **env_extra}
    t0 = time.monotonic()
    proc = subprocess.Popen([INFLIGHTD, "serve", "--config", config, "--socket", sock], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "log", "wb"))
    listener.settimeout(600)
    while b"READY=1" not in listener.recv(4096):
        pass
    ready = time.monotonic() - t0
    listener.close()
    return proc, sock, ready


def chat_ttft(sock: str, content: str) -> float:
    """Seconds from sending the request to the first content chunk of the SSE stream."""
    conn = UnixHTTPConnection(sock)
    body = json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 16, "temperature": 0,
                       "stream": True})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    buf = b""
    first = None
    while chunk := r.read1(65536):
        buf += chunk
        if first is None and b'"content":"' in buf.replace(b'"content":""', b""):
            first = time.perf_counter() - t0
    conn.close()
    assert first is not None, buf[:500]
    return first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idle-s", type=float, default=60.0)
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "etc" / "inflightd.yaml"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cold_cache = tmp / "numba-cold"
        cold_cache.mkdir()
        for label, env in (("cold", {"NUMBA_CACHE_DIR": str(cold_cache)}), ("warm", {})):
            run = tmp / label
            run.mkdir()
            proc, sock, ready = start(run, args.config, env)
            try:
                row = {"numba_cache": label, "ready_s": round(ready, 2)}
                if label == "warm":
                    p = psutil.Process(proc.pid)
                    time.sleep(2.0)  # let start-up work settle
                    c0 = sum(p.cpu_times()[:2])
                    time.sleep(args.idle_s)
                    c1 = sum(p.cpu_times()[:2])
                    row["idle_cpu_pct"] = round(100 * (c1 - c0) / args.idle_s, 3)
                    row["rss_mb"] = round(p.memory_info().rss / 2**20, 1)
                    first = chat_ttft(sock, "What is the capital of France?")
                    again = [chat_ttft(sock, "What is the capital of France?") for _ in range(5)]
                    fresh = [chat_ttft(sock, f"What is the capital of country number {i}?") for i in range(5)]
                    row["ttft_first_ms"] = round(first * 1e3, 1)
                    row["ttft_new_prompt_ms_median"] = round(statistics.median(fresh) * 1e3, 1)
                    row["ttft_cached_prompt_ms_median"] = round(statistics.median(again) * 1e3, 1)
                    row["rss_after_requests_mb"] = round(p.memory_info().rss / 2**20, 1)
                rows.append(row)
            finally:
                proc.terminate()
                proc.wait(60)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print(f"<!-- python benchmarks/daemon.py --idle-s {args.idle_s:g} -->")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")


if __name__ == "__main__":
    main()
