"""Serving throughput: ``kubetune serve`` answering 8 concurrent clients against 1, through the official client.

One ``kubetune serve`` on the toy Llama (:mod:`kubetune_trainer.toy`) is asked the same
``--requests`` completions (distinct toy prompts, temperature 0, ``--max-tokens`` each, no stop
sequence, so every answer is ``--max-tokens`` tokens unless the model ends it) by the official
``openai`` client: first one request at a time (1 client), then by 8 clients at once. Throughput is
completion tokens (the answers' ``usage``) over the wall time of all the requests; the best of
``--rounds`` of each is compared, and the ratio 8 clients / 1 client is printed (target ≥ 3×:
batched generation). The 8-client answers must be identical to the one-at-a-time answers, which
is checked and printed too (padding in a batch must not change a greedy answer).

    .venv/bin/python -m bench.serve_throughput [--requests 32] [--max-tokens 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from openai import OpenAI

from kubetune_local.controlplane import free_port
from kubetune_trainer.toy import build_toy, toy_facts, toy_prompt

CLIENTS = 8


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


def _wait_ready(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"kubetune serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    sys.exit(f"kubetune serve was not ready in 120 s:\n{log.read_text()}")


def _run(client: OpenAI, prompts: list[str], max_tokens: int, clients: int) -> tuple[list[str], int, float]:
    """Every prompt's answer, the completion tokens, and the seconds it all took with ``clients`` at once."""

    def ask(prompt: str) -> tuple[str, int]:
        answer = client.completions.create(model="base", prompt=prompt, max_tokens=max_tokens, temperature=0)
        return answer.choices[0].text, answer.usage.completion_tokens if answer.usage else 0

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(ask, prompts))
    seconds = time.perf_counter() - started
    return [text for text, _ in results], sum(tokens for _, tokens in results), seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32, help="completions asked per measurement (default 32)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each (default 64)")
    parser.add_argument("--rounds", type=int, default=2, help="measurements of each side; the best counts (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (default 1)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        folder = Path(tmp)
        model = build_toy(folder / "toy") / "model"
        port = free_port()
        log = folder / "serve.log"
        command = [sys.executable, "-m", "kubetune_cli.main", "serve", "--model", str(model)]
        command += ["--host", "127.0.0.1", "--port", str(port), "--max-new-tokens-limit", str(args.max_tokens)]
        command += ["--max-batch", str(CLIENTS), "--max-queued", str(args.requests)]
        with open(log, "wb") as out:
            process = subprocess.Popen(command, env=_env(args.threads), stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_ready(port, process, log)
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
            objects = list(toy_facts())
            prompts = [toy_prompt(objects[i % len(objects)]) + " ." * (i // len(objects)) for i in range(args.requests)]
            _run(client, prompts[:CLIENTS], args.max_tokens, CLIENTS)  # warm-up
            best: dict[int, float] = {}
            answers: dict[int, list[str]] = {}
            for round_ in range(args.rounds):
                for clients in (1, CLIENTS):
                    texts, tokens, seconds = _run(client, prompts, args.max_tokens, clients)
                    rate = tokens / seconds
                    print(
                        f"round {round_ + 1}, {clients} client(s): {tokens} completion tokens in {seconds:.2f} s "
                        f"= {rate:.0f} tokens/s",
                        flush=True,
                    )
                    best[clients] = max(best.get(clients, 0.0), rate)
                    if answers.setdefault(clients, texts) != texts:
                        print(f"  answers differ between rounds with {clients} client(s)")
        finally:
            process.terminate()
            process.wait(timeout=30)
    same = answers[1] == answers[CLIENTS]
    differ = sum(a != b for a, b in zip(answers[1], answers[CLIENTS], strict=True))
    ratio = best[CLIENTS] / best[1]
    print(
        json.dumps(
            {
                "requests": args.requests,
                "max_tokens": args.max_tokens,
                "tokens_per_second_1_client": round(best[1], 1),
                f"tokens_per_second_{CLIENTS}_clients": round(best[CLIENTS], 1),
                "ratio": round(ratio, 2),
                "target": 3.0,
                "answers_identical": same,
            }
        )
    )
    print(f"{CLIENTS} clients / 1 client: {ratio:.2f}x (target >= 3x)")
    print(
        f"{CLIENTS}-client answers identical to one-at-a-time answers: "
        f"{'yes' if same else f'NO ({differ} of {len(answers[1])} differ)'}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
