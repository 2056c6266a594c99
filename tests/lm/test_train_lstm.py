"""The training loop's LSTM kernel (lm/kernels/train_lstm.py, lm/kernels/csrc/lstm_train.cpp) against nn.LSTM: the same
function and the same gradients from the same parameters, in fp32 to float rounding and under bf16
autocast to bf16 rounding; its dropout; and training through it."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from lm.kernels import train_lstm
from lm.model import LSTMLanguageModel, ModelConfig
from lm.train import TrainConfig, keep_freed_memory, train

CORPUS = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 30


def _model(vocab: int, embedding: int, hidden: int, layers: int, dropout: float = 0.0) -> LSTMLanguageModel:
    torch.manual_seed(3)
    model = LSTMLanguageModel(ModelConfig(vocab, embedding, hidden, layers, dropout)).train()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # away from the init's zero biases, so every gate term matters
    return model


def _run(model: LSTMLanguageModel, forward, ids: torch.Tensor, state, bf16: bool = False):  # noqa: ANN001, ANN202
    """Logits, final state and every gradient of a loss that reads the logits and the final state."""
    model.zero_grad(set_to_none=True)
    if state is not None:
        state = tuple(s.detach().clone().requires_grad_(True) for s in state)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits, (h, c) = forward(ids, state)
    loss = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten()) + 0.1 * (h.float().sum() + c.float().sum())
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    if state is not None:
        grads["h0"], grads["c0"] = state[0].grad, state[1].grad
    return logits.detach().float(), h.detach().float(), c.detach().float(), grads


def _fused(model: LSTMLanguageModel):  # noqa: ANN202
    return lambda ids, state: train_lstm.forward(model, ids, state)


@pytest.mark.parametrize(
    ("embedding", "hidden", "layers", "batch", "steps"),
    [(16, 24, 2, 4, 17), (12, 13, 3, 1, 9), (8, 64, 1, 5, 1)],
    ids=["24x2", "13x3-tail", "64x1-one-step"],
)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "carried-state"])
def test_fp32_matches_nn_lstm(embedding: int, hidden: int, layers: int, batch: int, steps: int, with_state: bool):
    """Outputs, final state and gradients (parameters and, when carried in, the initial state)."""
    model = _model(30, embedding, hidden, layers)
    ids = torch.randint(0, 30, (batch, steps), generator=torch.Generator().manual_seed(1))
    state = (torch.randn(layers, batch, hidden) * 0.5, torch.randn(layers, batch, hidden)) if with_state else None
    ref_logits, ref_h, ref_c, ref_grads = _run(model, model, ids, state)
    logits, h, c, grads = _run(model, _fused(model), ids, state)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, ref_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c, ref_c, rtol=1e-5, atol=1e-5)
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_bf16_is_as_close_to_fp32_as_nn_lstm_in_bf16() -> None:
    """Under autocast both run their products in bf16: measured against the fp32 gradients, the kernel's
    gradients are off by bf16 rounding (under 2%), no more than twice as far as nn.LSTM's own bf16 ones."""
    torch.manual_seed(3)
    model = LSTMLanguageModel(ModelConfig(40, 32, 128, 2, 0.0)).train()  # the model's own initialization
    ids = torch.randint(0, 40, (8, 64), generator=torch.Generator().manual_seed(2))
    ref_logits, _, _, ref = _run(model, model, ids, None)
    _, _, _, theirs = _run(model, model, ids, None, bf16=True)
    logits, _, _, ours = _run(model, _fused(model), ids, None, bf16=True)
    torch.testing.assert_close(logits, ref_logits, rtol=0.05, atol=0.05)
    for name, exact in ref.items():
        ours_err = ((ours[name] - exact).norm() / exact.norm()).item()
        theirs_err = ((theirs[name] - exact).norm() / exact.norm()).item()
        assert ours_err < 0.02 and ours_err <= 2 * theirs_err + 0.002, f"{name}: {ours_err:.4f} vs {theirs_err:.4f}"


def test_two_windows_in_flight_keep_their_own_saved_tensors() -> None:
    """Saved activations live in reused buffers: a second forward before the first backward must not
    overwrite the first's (the buffers are handed out again only once nothing holds them)."""
    model = _model(30, 16, 32, 2)
    gen = torch.Generator().manual_seed(4)
    first, second = torch.randint(0, 30, (4, 12), generator=gen), torch.randint(0, 30, (4, 12), generator=gen)

    def grads_of(*batches: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        losses = [F.cross_entropy(train_lstm.forward(model, ids)[0].flatten(0, 1), ids.flatten()) for ids in batches]
        sum(losses).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    one_by_one = {name: a + b for (name, a), b in zip(grads_of(first).items(), grads_of(second).values(), strict=True)}
    together = grads_of(first, second)  # both graphs alive at once
    for name, grad in one_by_one.items():
        torch.testing.assert_close(together[name], grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_drops_p_and_scales_the_rest(p: float) -> None:
    x = torch.ones(64, 32, 100, requires_grad=True)
    torch.manual_seed(0)
    out = train_lstm._dropout(x, p, training=True)
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - p) < 0.01
    assert torch.all((out == 0) | (out == torch.tensor(1 / (1 - p))))
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # the backward applies the forward's own mask
    torch.manual_seed(0)
    assert torch.equal(train_lstm._dropout(x, p, training=True), out)  # seeded: the same mask
    assert not torch.equal(train_lstm._dropout(x, p, training=True), out)  # next draw: another mask
    assert train_lstm._dropout(x, p, training=False) is x


def test_dropout_keeps_bf16_and_odd_sizes() -> None:
    x = torch.randn(7, 3, 13).to(torch.bfloat16)  # 273 elements: vector body and scalar tail
    out = train_lstm._dropout(x, 0.3, training=True)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    kept = out != 0
    torch.testing.assert_close(out[kept], (x[kept].float() / 0.7).to(torch.bfloat16))


def test_training_runs_through_the_kernel_and_learns() -> None:
    cfg = TrainConfig(hidden_dim=32, embedding_dim=16, seq_len=32, batch_size=4, epochs=3, lr=1e-2, seed=1)
    result = train(CORPUS, cfg)
    assert result.metrics["lstm_kernel"] == "textgen"
    first, last = result.history[0]["val_loss"], result.history[-1]["val_loss"]
    assert last < first


def test_native_false_trains_with_nn_lstm_instead() -> None:
    cfg = TrainConfig(hidden_dim=16, embedding_dim=8, seq_len=16, batch_size=2, max_steps=3, seed=1)
    assert train(CORPUS, cfg, native=False).metrics["lstm_kernel"] == "nn.LSTM"


def test_seeded_training_through_the_kernel_repeats_exactly() -> None:
    cfg = TrainConfig(hidden_dim=24, embedding_dim=8, seq_len=16, batch_size=4, max_steps=6, dropout=0.2, seed=7)
    a, b = train(CORPUS, cfg), train(CORPUS, cfg)
    assert a.metrics["lstm_kernel"] == "textgen"
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_training_processes_keep_freed_memory() -> None:
    """The allocator setting lm.train applies on CPU takes (a wrong mallopt call would return 0)."""
    assert keep_freed_memory() is True
