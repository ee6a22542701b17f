"""How many CPU trials side by side, with how many threads each: measured, not guessed.

`resources_per_trial: {cpu: auto}` asks for this. For every split of the machine's CPUs into equal
shares (2 CPUs: 2 trials x 1 thread or 1 x 2), it trains copies of the sweep's base model concurrently
for about a second (twice, interleaved), each copy in its own Python thread with that many intra-op
threads (PyTorch releases the GIL inside ops, so the copies run in parallel the way separate trial
processes do), and keeps the split with the most tokens/s in total. The result is cached per machine,
model, batch and torch version (`$LM_SWEEPS_CACHE/placement.json`), so only a machine's first sweep of a
model pays the few seconds.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lm.config import Config
from lm.files import write_atomic
from lm.model import TransformerLM
from lm.optim import AdamW
from lm.stories import default_cache_root
from lm.train import train_step

PROBE_TOKENS = 2048  # tokens per probe step: the per-token cost barely depends on batch, the probe's time does
PROBE_SECONDS = 1.0  # per split and round, after one warm-up step per copy
PROBE_ROUNDS = 2


@dataclass(frozen=True)
class Placement:
    threads: int  # intra-op threads (and Ray CPUs) per trial
    trials: int  # trials side by side on this machine
    tokens_per_s: dict[str, float]  # "trials x threads" -> measured total tokens/s
    cached: bool = False


def _splits(cpus: int) -> list[int]:
    """Threads-per-trial candidates: the divisors of `cpus`."""
    return [t for t in range(1, cpus + 1) if cpus % t == 0]


def _cache_key(config: Config, cpus: int, batch: int) -> str:
    cpu_name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu_name)
    except OSError:
        pass
    model = json.dumps(asdict(config.model), sort_keys=True)
    return f"{cpu_name}|cpus={cpus}|torch={torch.__version__}|batch={batch}|{model}"


def _throughput(config: Config, threads: int, copies: int, batch: int) -> float:
    """Total tokens/s of `copies` concurrent training loops with `threads` intra-op threads each."""
    ctx = config.model.context_length
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    setups = []
    for _ in range(copies):
        model = TransformerLM.from_config(config.model)
        optimizer = AdamW(model.parameters())
        x = torch.randint(0, config.model.vocab_size, (batch, ctx), generator=gen)
        setups.append((model, optimizer, x))
    counts = [0] * copies
    start = threading.Barrier(copies + 1)
    stop = threading.Event()

    def loop(i: int) -> None:
        model, optimizer, x = setups[i]

        grad_clip = config.optimizer.grad_clip
        train_step(model, optimizer, x, x, 1e-4, grad_clip)  # warm-up, then every copy starts timing together
        start.wait()
        while not stop.is_set():
            train_step(model, optimizer, x, x, 1e-4, grad_clip)
            counts[i] += 1

    workers = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(copies)]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(PROBE_SECONDS)
    stop.set()  # each copy finishes the step it is in; the clock runs until they have
    for w in workers:
        w.join()
    return sum(counts) * batch * ctx / (time.perf_counter() - t0)


def measure(config: Config, cpus: int | None = None, cache: Path | None = None) -> Placement:
    """Measure (or read from the cache) the best trials x threads split of `cpus` (default: all) for `config`."""
    cpus = cpus or os.cpu_count() or 1
    batch = max(1, min(config.data.batch_size, PROBE_TOKENS // config.model.context_length))
    cache = cache or default_cache_root() / "placement.json"
    key = _cache_key(config, cpus, batch)
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return Placement(**known[key], cached=True)

    old_threads = torch.get_num_threads()
    rates: dict[int, float] = {}
    try:
        # Rounds alternate the splits so a slow moment on a shared machine hits them all; best round each.
        for _ in range(PROBE_ROUNDS):
            for t in _splits(cpus):
                rates[t] = max(rates.get(t, 0.0), _throughput(config, t, cpus // t, batch))
    finally:
        torch.set_num_threads(old_threads)
    best = max(rates, key=rates.get)
    placement = Placement(best, cpus // best, {f"{cpus // t} x {t}": round(r, 1) for t, r in rates.items()})
    known[key] = {k: v for k, v in asdict(placement).items() if k != "cached"}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache, json.dumps(known, indent=1))  # a cache, not state: a lost race costs a re-measurement
    except OSError:
        pass
    return placement
