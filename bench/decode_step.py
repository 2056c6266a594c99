"""Decode speed in-process: textgen's engine against a plain per-step nn.LSTM loop, same weights and sampling.

    python bench/decode_step.py                  # the shipped default model, as the server would choose
    python bench/decode_step.py --tokens 500 --rounds 2

First the engine's own choice (lm/decode/tune.py, measured here without a cache), as a server would
make it. Single stream: the plain loop is the textbook one (the model's forward on a (1, 1) batch,
state carried, `SequenceSampler.choose` + `push` per token); textgen's number is a real `Engine` with
one sequence, from its first token event to its `Finished` on the asyncio side: the engine as it
chooses (`textgen`), then pinned to each configuration it chooses from. Both use the same seed and
sampling parameters; the rounds alternate (plain, then each engine) so a noisy neighbour slows all,
and the ratio is the median of per-round ratios. Then the batch sweep: the decode step + batched
sampling alone at B = 1..64 for every configuration, and the chosen one against the fastest fixed
one at each batch size (target: within 5%). Then whole prompts, and parity with the reference.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from loadgen import DEFAULT_MODEL  # noqa: E402
from plots import line_chart  # noqa: E402
from results import figure, machine_summary, write_section  # noqa: E402

from app.engine import Engine, EngineOptions, Finished, Sequence  # noqa: E402
from app.metrics import Metrics  # noqa: E402
from lm import cpu  # noqa: E402
from lm.batch_sampler import choose_batch  # noqa: E402
from lm.decode import DECODE_KINDS, Step, build_step  # noqa: E402
from lm.decode.tune import Config, Plan, build, build_planned, thread_options, tune  # noqa: E402
from lm.kernels import native  # noqa: E402
from lm.registry import Registry  # noqa: E402
from lm.sampler import SamplingParams, SequenceSampler, prompt_ids  # noqa: E402

PROMPT = "ROMEO:\nBut, soft! what light through yonder window breaks?\n"
BATCHES = (1, 2, 4, 8, 16, 32, 64)


def variants(plan: Plan) -> list[Config]:
    """Every configuration the engine chooses from here (the plan's threads and, for each kind, each
    product this CPU and build can run), and int8 with its loops in Python (TEXTGEN_NATIVE=false)."""
    threads = sorted(set(thread_options(cpu.cores())) | {plan.threads})
    configs = [Config.parse(label) for label in plan.tokens_per_s]
    configs = [c for c in configs if c.threads in threads]
    return [*configs, *[Config("int8", "python", n) for n in threads]]


def variant_step(model, config: Config) -> Step:
    return build(model, config, vnni_rows=max(BATCHES))


def plain_loop(model, tokenizer, params: SamplingParams, onednn: bool = True) -> float:
    """Tokens/s of the textbook loop: one nn.LSTM call per token, the sampler per token.

    `onednn=False` is the same loop with torch's oneDNN backend switched off: nn.LSTM then skips
    re-formatting its weights on every call, the best a user gets without changing the code."""
    ids = prompt_ids(tokenizer, PROMPT)
    sampler = SequenceSampler(tokenizer, params, ids)
    with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=onednn):
        logits, state = model(torch.tensor([ids]))
        logits = logits[0, -1]
        started = time.perf_counter()
        while not sampler.finished:
            token = sampler.choose(logits)
            sampler.push(token)
            out, state = model(torch.tensor([[token]]), state)  # (1, 1, V)
            logits = out[0, -1]
    return sampler.completion_tokens / (time.perf_counter() - started)


async def engine_stream(engine: Engine, params: SamplingParams) -> float:
    """Tokens/s of one sequence through a running Engine, first token event to Finished."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    ids = prompt_ids(engine.tokenizer, PROMPT)
    engine.submit(Sequence(ids, SequenceSampler(engine.tokenizer, params, ids), loop, queue))
    _, first = await queue.get()
    started = time.perf_counter()
    while True:
        _, event = await queue.get()
        if isinstance(event, Finished):
            return (event.usage["completion_tokens"] - 1) / (time.perf_counter() - started)


def make_engine(checkpoint, config: Config | None) -> Engine:
    """The engine as it chooses (config None), or pinned to one configuration."""
    if config is None:
        options = EngineOptions(decode="auto", stream_interval_s=0.020, prompt_cache_bytes=0)
    else:
        product = config.product if config.product in ("vnni", "onednn") else "auto"
        native = config.product != "python"
        options = EngineOptions(
            decode=config.kind,
            threads=config.threads,
            int8_product=product,
            stream_interval_s=0.020,
            prompt_cache_bytes=0,
            native_loops=native,
        )
    engine = Engine(
        checkpoint.model,
        checkpoint.tokenizer,
        model_id=checkpoint.model_id,
        max_running=64,
        device=torch.device("cpu"),
        metrics=Metrics(),
        options=options,
    )
    engine.start()
    engine.ready.wait()
    return engine


def single_stream(checkpoint, configs: list[Config], tokens: int, rounds: int) -> dict[str, list[float]]:
    params = SamplingParams(max_tokens=tokens, temperature=0.8, top_k=40, seed=1)
    engines = {"textgen (as it chooses)": make_engine(checkpoint, None)}
    engines |= {c.label: make_engine(checkpoint, c) for c in configs}
    runs: dict[str, list[float]] = {"plain": [], "plain, oneDNN off": [], **{label: [] for label in engines}}
    try:
        for _ in range(rounds):
            runs["plain"].append(plain_loop(checkpoint.model, checkpoint.tokenizer, params))
            runs["plain, oneDNN off"].append(plain_loop(checkpoint.model, checkpoint.tokenizer, params, onednn=False))
            for kind, engine in engines.items():
                runs[kind].append(asyncio.run(engine_stream(engine, params)))
    finally:
        for engine in engines.values():
            engine.stop()
            engine.join(5)
    return runs


def batch_sweep(checkpoint, configs: list[Config], plan: Plan, steps: int) -> dict[str, list[float]]:
    """Tokens/s of step + batched sampling alone, per configuration and batch size; "chosen" is the
    plan's step (its product changes with the batch size as served)."""
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    H, L, V = model.cfg.hidden_dim, model.cfg.layers, model.cfg.vocab_size
    out: dict[str, list[float]] = {}
    before = torch.get_num_threads()
    for label, step, threads, native_loops in [
        *((c.label, variant_step(model, c), c.threads, c.product != "python") for c in configs),
        ("chosen", build_planned(model, plan), plan.threads, plan.loops == "C++"),
    ]:
        torch.set_num_threads(threads)
        kind = label
        out[kind] = []
        for B in BATCHES:
            samplers = [
                SequenceSampler(tokenizer, SamplingParams(temperature=0.8, top_k=40, seed=i), [0]) for i in range(B)
            ]
            tokens = torch.randint(0, V, (B,), generator=torch.Generator().manual_seed(0))
            h, c = torch.zeros(L, B, H), torch.zeros(L, B, H)
            n = max(10, steps // (4 if kind.startswith("reference") else 1))
            with torch.inference_mode():
                for i in range(n + 5):
                    if i == 5:
                        started = time.perf_counter()
                    logits = step(tokens, h, c)
                    tokens = torch.tensor(choose_batch(samplers, logits, native_draws=native_loops))
            out[kind].append(n * B / (time.perf_counter() - started))
    torch.set_num_threads(before)
    return out


def prompt_times(checkpoint, configs: list[Config], plan: Plan, runs: int = 15) -> dict[str, list[float]]:
    """ms per 200-token prompt, per configuration: one prompt alone (`prefill`), and 8 prompts together
    (`steps`, the engine's batched prefill; ms for all 8). Median of `runs`."""
    model = checkpoint.model
    H, L, V = model.cfg.hidden_dim, model.cfg.layers, model.cfg.vocab_size
    ids = torch.randint(0, V, (8, 200), generator=torch.Generator().manual_seed(0))
    out: dict[str, list[float]] = {}
    before = torch.get_num_threads()
    for label, step, threads in [
        *((c.label, variant_step(model, c), c.threads) for c in configs),
        ("chosen", build_planned(model, plan), plan.threads),
    ]:
        torch.set_num_threads(threads)
        times: list[list[float]] = [[], []]
        with torch.inference_mode():
            for _ in range(runs if not label.startswith("reference") else 3):
                for i, (call, rows) in enumerate(((step.prefill, ids[0]), (step.steps, ids))):
                    k = 1 if rows.dim() == 1 else rows.shape[0]
                    h, c = torch.zeros(L, k, H), torch.zeros(L, k, H)
                    started = time.perf_counter()
                    call(rows, h, c)
                    times[i].append((time.perf_counter() - started) * 1000)
        out[label] = [statistics.median(t) for t in times]
    torch.set_num_threads(before)
    return out


def weight_bytes(model, config: Config) -> int:
    """Bytes one B=1 step reads that do not stay put in a core's registers: the recurrent weights in
    their format, the fp32 head, and the token's input row (the table or the embedding)."""
    cfg = model.cfg
    H, E, V, L = cfg.hidden_dim, cfg.embedding_dim, cfg.vocab_size, cfg.layers
    recurrent = H * 4 * H + (L - 1) * 2 * H * 4 * H  # layer 0: W_hh (its input is a table row); above: [W_ih | W_hh]
    head = (H * V + V) * 4
    if config.kind == "int8":
        return recurrent + L * 4 * H * 8 + 4 * H * 4 + head  # codes, scales and biases, the table row, the head
    if config.kind == "fused":
        return recurrent * 4 + L * 4 * H * 4 + 4 * H * 4 + head
    return (4 * H * E + recurrent) * 4 + 8 * 4 * H * L + E * 4 + head  # nn.LSTM: W_ih0 too, both biases


def roof(checkpoint, configs: list[Config]) -> list[dict]:
    """For each weight format at B=1: the bytes a step reads, the bandwidth a pure streaming read of
    that many bytes reaches here with the step's threads (lm/kernels native read_seconds), and the
    bandwidth the step reaches (bytes x steps/s)."""
    module = native.load()
    model = checkpoint.model
    rows = []
    before = torch.get_num_threads()
    for config in configs:
        if module is None or config.product == "python":
            continue
        torch.set_num_threads(config.threads)
        step = variant_step(model, config)
        nbytes = weight_bytes(model, config)
        buffer = torch.zeros(nbytes, dtype=torch.int8)
        module.read_seconds(buffer, 20, config.threads)
        read = nbytes / module.read_seconds(buffer, 200, config.threads)
        tokens, h = torch.tensor([1]), torch.zeros(model.cfg.layers, 1, model.cfg.hidden_dim)
        c = torch.zeros_like(h)
        with torch.inference_mode():
            for _ in range(50):
                step(tokens, h, c)
            n = 400 if config.kind != "reference" else 50
            started = time.perf_counter()
            for _ in range(n):
                step(tokens, h, c)
            per_step = (time.perf_counter() - started) / n
        rows.append(
            {"config": config.label, "bytes": nbytes, "roof": read, "reached": nbytes / per_step, "us": per_step * 1e6}
        )
    torch.set_num_threads(before)
    return rows


def parity(checkpoint) -> dict:
    """int8 and fused against the reference on the shipped model, over 2,000 teacher-forced corpus
    characters: the largest |log p| difference (every entry; int8 on the next characters only), the
    loss of int8 and of the reference; and for 5 prompts whether 200 greedy tokens are the same text."""
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    text = (ROOT / "data" / "shakespeare" / "shakespeare.txt").read_text(encoding="utf-8")[100_000:102_000]
    tokens = torch.tensor(tokenizer.encode(text))
    logprobs = {}
    for kind in DECODE_KINDS:
        step = build_step(model, kind)
        h, c = model.init_state(1)
        with torch.inference_mode():
            rows = [torch.log_softmax(step(t[None], h, c)[0], dim=-1) for t in tokens]
        logprobs[kind] = torch.stack(rows)
    int8_gap = float((logprobs["int8"] - logprobs["reference"]).abs().max())
    fused_gap = float((logprobs["fused"] - logprobs["reference"]).abs().max())
    nexts = torch.arange(len(tokens) - 1), tokens[1:]  # each position's actual next character
    next_gap = float((logprobs["int8"] - logprobs["reference"])[nexts].abs().max())
    loss = {kind: float(-logprobs[kind][nexts].mean()) for kind in ("reference", "int8")}
    greedy = []
    for prompt in ("ROMEO:\n", "KING HENRY:\nWhat", "First Citizen:\n", "O, ", "The "):
        texts = {}
        for kind in ("reference", "int8"):
            step = build_step(model, kind)
            h, c = model.init_state(1)
            ids = tokenizer.encode(prompt)
            with torch.inference_mode():
                logits = step.prefill(torch.tensor(ids), h, c)
                out = []
                for _ in range(200):
                    token = int(logits.argmax())
                    out.append(token)
                    logits = step(torch.tensor([token]), h, c)[0]
            texts[kind] = out
        same = next((i for i, (a, b) in enumerate(zip(texts["reference"], texts["int8"], strict=True)) if a != b), 200)
        greedy.append(f"{prompt!r}: {'identical' if same == 200 else f'first difference at token {same}'}")
    return {"int8_gap": int8_gap, "fused_gap": fused_gap, "next_gap": next_gap, "loss": loss, "greedy": greedy}


def plot(sweep: dict[str, list[float]], path: Path) -> None:
    line_chart(
        path,
        BATCHES,
        sweep,
        xlabel="running sequences (batch)",
        ylabel="tokens/s (step + sampling)",
        title="Decode step throughput, one engine thread",
        log2_x=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sweep-steps", type=int, default=200)
    args = parser.parse_args()
    checkpoint = Registry(ROOT / "models").load(args.model)
    torch.set_num_threads(cpu.cores())
    plan = tune(checkpoint.model, max_running=max(BATCHES))  # as an engine would, without the cache
    configs = variants(plan)
    runs = single_stream(checkpoint, configs, args.tokens, args.rounds)
    sweep = batch_sweep(checkpoint, configs, plan, args.sweep_steps)
    prompts = prompt_times(checkpoint, configs, plan)
    par = parity(checkpoint)
    roofs = roof(checkpoint, [c for c in configs if c.threads == plan.threads])
    roof_rows = [
        "| configuration | bytes read per token | roof (a streaming read of as many) | step | reached | of the roof |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in roofs:
        roof_rows.append(
            f"| {r['config']} | {r['bytes'] / 2**20:.2f} MiB | {r['roof'] / 1e9:.1f} GB/s | {r['us']:.0f} us "
            f"| {r['reached'] / 1e9:.1f} GB/s | {r['reached'] / r['roof']:.0%} |"
        )
    figure_path, figure_link = figure("decode_step.png")
    plot({k: v for k, v in sweep.items() if k != "chosen"}, figure_path)
    fixed = {k: v for k, v in sweep.items() if k != "chosen" and not k.endswith("/python/1t")}
    choice_rows = [
        "| batch | chosen | tokens/s | fastest fixed | tokens/s | chosen / fastest |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    worst = 1.0
    for i, b in enumerate(BATCHES):
        best = max(fixed, key=lambda k: fixed[k][i])
        ratio = sweep["chosen"][i] / fixed[best][i]
        worst = min(worst, ratio)
        choice_rows.append(
            f"| {b} | {plan.config_at(b).label} | {sweep['chosen'][i]:,.0f} | {best} | {fixed[best][i]:,.0f} "
            f"| {ratio:.1%} |"
        )

    rows = [
        "| path | tokens/s (median) | all rounds | x plain | x plain, oneDNN off |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, values in runs.items():
        ratios = [  # median of per-round ratios: a noisy neighbour slows a whole round
            statistics.median(v / p for v, p in zip(values, runs[base], strict=True))
            for base in ("plain", "plain, oneDNN off")
        ]
        all_rounds = ", ".join(f"{v:,.0f}" for v in values)
        rows.append(
            f"| {name} | {statistics.median(values):,.0f} | {all_rounds} | {ratios[0]:.1f}x | {ratios[1]:.1f}x |"
        )
    sweep_rows = ["| kind | " + " | ".join(f"B={b}" for b in BATCHES) + " |", "|---" * (len(BATCHES) + 1) + "|"]
    for kind, values in sweep.items():
        sweep_rows.append(f"| {kind} | " + " | ".join(f"{v:,.0f}" for v in values) + " |")
    prompt_rows = ["| step | 1 prompt alone | 8 prompts together |", "| --- | --- | --- |"]
    for label, (alone, together) in prompts.items():
        prompt_rows.append(f"| {label} | {alone:.1f} ms | {together:.1f} ms |")
    body = f"""
Machine: {machine_summary()}; torch {torch.__version__}; load average at start
{Path("/proc/loadavg").read_text().split()[0]}.
Command: `python bench/decode_step.py --tokens {args.tokens} --rounds {args.rounds}` (model `{args.model}`).

The engine's choice here (lm/decode/tune.py, no cache): **{plan.summary()}**. Parity of each kind
with the reference in that measurement (worst |log p| difference, greedy continuations):
{", ".join(f"{k} {v:.2g}" for k, v in plan.parity.items())}.

Single stream, {args.tokens} tokens, temperature 0.8, top-k 40, same seed. `plain` is the textbook
per-step `nn.LSTM` loop with `SequenceSampler` (torch defaults: oneDNN re-formats the LSTM weights on
every call); `plain, oneDNN off` is the same loop with `torch.backends.mkldnn` disabled, a stronger
baseline; the others are textgen's `Engine` (one sequence, 20 ms stream coalescing): as it chooses,
then pinned to each configuration `kind/product/threads` (`vnni`: textgen's AVX-512 VNNI products,
`onednn`: oneDNN's, `python`: int8 with its loops in Python, `TEXTGEN_NATIVE=false`).
Target: >= 4x plain.

{chr(10).join(rows)}

Decode step + batched sampling alone, tokens/s by batch size:

{chr(10).join(sweep_rows)}

The chosen configuration against the fastest fixed one at each batch size (C++ loops; target: within
5%, worst here **{worst:.1%}**):

{chr(10).join(choice_rows)}

![decode step throughput]({figure_link})

200-token prompts, ms (median of 15; `prefill` for one prompt, the engine's batched `steps` for 8):

{chr(10).join(prompt_rows)}

The batch-1 roof: a one-row step reads every weight once per token, so its speed is bounded by how
fast this CPU streams that many bytes from where they live (one core's L2 holds about 2 MiB here; more
spills to the shared cache or memory). The roof is a pure streaming read of the same number of bytes
with the same threads (target: the chosen step >= 50% of its roof):

{chr(10).join(roof_rows)}

Parity with the reference step on this model, over 2,000 teacher-forced corpus characters: largest
|log p(int8) - log p(fp32)| over every entry of every distribution **{par["int8_gap"]:.4f} nats**
(fused fp32: {par["fused_gap"]:.1e}); over the actual next characters only {par["next_gap"]:.4f};
loss (nats/char) reference {par["loss"]["reference"]:.5f}, int8 {par["loss"]["int8"]:.5f}
({par["loss"]["int8"] - par["loss"]["reference"]:+.5f}). 200 greedy tokens, int8 against reference:
{"; ".join(par["greedy"])}.
"""
    write_section("Decode step (bench/decode_step.py)", body)
    print(body)


if __name__ == "__main__":
    main()
