"""The batching runtime, in process: merging, shape grouping, admission, cancelled callers."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest
import torch

from dmoe.core.experts import create_expert
from dmoe.node.backend import ExpertBackend
from dmoe.node.runtime import Overloaded, Runtime, Task

pytestmark = pytest.mark.timeout(60)
HIDDEN = 16
MAX_BATCH_TOKENS = 4096


def backend(uid: str, expert_cls: str = "ffn") -> ExpertBackend:
    module, input_schema = create_expert(expert_cls, uid=uid, hidden_dim=HIDDEN)
    return ExpertBackend(
        uid, module=module, input_schema=input_schema, device=torch.device("cpu"),
        make_optimizer=lambda params: torch.optim.Adam(params, lr=1e-3), expert_cls=expert_cls,
        optimizer_name="adam", max_grad_norm=1.0, max_batch_tokens=MAX_BATCH_TOKENS,
    )


def task(x: torch.Tensor, grad: torch.Tensor | None = None) -> Task:
    return Task([x], None if grad is None else [grad], x.shape[0], x.shape[:-1].numel(),
                concurrent.futures.Future())


@pytest.mark.parametrize("batching,expected_batches", [(True, 1), (False, 6)])
def test_queued_requests_merge_into_one_device_call(batching, expected_batches):
    runtime = Runtime({"ffn.0": backend("ffn.0")}, max_batch_tokens=1024, max_queued_tokens=4096,
                      batching=batching)
    inputs = [torch.randn(n, HIDDEN) for n in (1, 5, 3, 8, 2, 7)]
    tasks = [task(x) for x in inputs]
    for t in tasks:  # all queued before the device thread starts: it finds them waiting together
        runtime.submit("ffn.0", t)
    runtime.start()
    local = create_expert("ffn", uid="ffn.0", hidden_dim=HIDDEN)[0]
    for x, t in zip(inputs, tasks):
        with torch.no_grad():
            torch.testing.assert_close(t.future.result(30)[0], local(x), rtol=1e-5, atol=1e-6)
    runtime.shutdown(10)
    assert runtime.num_batches == expected_batches


def test_batches_respect_the_token_limit_and_shapes():
    runtime = Runtime({"tf.0": backend("tf.0", "transformer")}, max_batch_tokens=12, max_queued_tokens=64,
                      batching=True)
    inputs = [torch.randn(2, seq, HIDDEN) for seq in (3, 3, 5, 3, 3, 3)]
    tasks = [task(x) for x in inputs]
    for t in tasks:
        runtime.submit("tf.0", t)
    runtime.start()
    local = create_expert("transformer", uid="tf.0", hidden_dim=HIDDEN)[0].eval()
    for x, t in zip(inputs, tasks):
        with torch.no_grad():
            torch.testing.assert_close(t.future.result(30)[0], local(x), rtol=1e-4, atol=1e-5)
    runtime.shutdown(10)
    # tokens are rows x seq (6 or 10 here), at most 12 a batch:
    # [seq 3, seq 3] | [seq 5] | [seq 3, seq 3] | [seq 3]: a new shape or a full batch starts another
    assert runtime.num_batches == 4


def test_admission_control_and_cancelled_callers():
    runtime = Runtime({"ffn.0": backend("ffn.0")}, max_batch_tokens=8, max_queued_tokens=10, batching=True)
    first, cancelled = task(torch.randn(6, HIDDEN)), task(torch.randn(4, HIDDEN))
    runtime.submit("ffn.0", first)
    runtime.submit("ffn.0", cancelled)
    with pytest.raises(Overloaded):
        runtime.submit("ffn.0", task(torch.randn(1, HIDDEN)))
    assert runtime.queued_tokens("ffn.0") == 10
    # backward has its own queue and limit
    runtime.submit("ffn.0", task(torch.randn(2, HIDDEN), torch.randn(2, HIDDEN)))
    cancelled.future.cancel()
    runtime.start()
    assert first.future.result(30)[0].shape == (6, HIDDEN)
    runtime.shutdown(10)
    assert cancelled.future.cancelled()
    assert runtime.queued_tokens("ffn.0") == 0
    assert runtime.num_batches == 2  # the cancelled task never ran


def test_a_cancelled_head_task_does_not_set_the_shape_of_the_batch():
    runtime = Runtime({"tf.0": backend("tf.0", "transformer")}, max_batch_tokens=64, max_queued_tokens=64,
                      batching=True)
    gone, b, c = (task(torch.randn(1, seq, HIDDEN)) for seq in (5, 7, 5))
    for t in (gone, b, c):
        runtime.submit("tf.0", t)
    gone.future.cancel()
    runtime.start()
    assert b.future.result(30)[0].shape == (1, 7, HIDDEN)
    assert c.future.result(30)[0].shape == (1, 5, HIDDEN)
    runtime.shutdown(10)


def test_tokens_count_every_position():
    tf = backend("tf.0", "transformer")
    assert tf.check_input_shapes([(2, 3, HIDDEN)], ["float32"]) == (2, 6)
    with pytest.raises(ValueError, match="negative"):
        tf.check_input_shapes([(2, -3, HIDDEN)], ["float32"])
    ffn = backend("ffn.0")
    assert ffn.check_input_shapes([(5, HIDDEN)], ["float32"]) == (5, 5)
    # max_batch_tokens x the widest input or output per token
    assert ffn.max_numel == MAX_BATCH_TOKENS * HIDDEN


@pytest.mark.parametrize("expert_cls", ["ffn", "transformer"])
def test_checking_a_gradient_request_runs_no_forward_pass_for_shape_preserving_experts(expert_cls):
    """A request that declares a long sequence and carries no data must cost nothing to refuse:
    the output shapes of built-in experts follow from the schema, with no probe."""
    b = backend("e.0", expert_cls)
    calls = []
    b.module.register_forward_hook(lambda *args: calls.append(1))
    shape = (1, 4096, HIDDEN) if expert_cls == "transformer" else (4096, HIDDEN)
    b.check_grad_output_shapes([shape], [shape], ["float32"])
    with pytest.raises(ValueError, match="must have shape"):
        b.check_grad_output_shapes([shape], [(1,)], ["float32"])
    assert calls == [] and b.output_shapes([shape]) == [(shape, "float32")]


def test_an_expert_that_changes_free_dimensions_is_probed():
    class Halve(torch.nn.Module):
        def __init__(self, hidden_dim: int):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(hidden_dim))

        def forward(self, x):  # [B, S, D] -> [B, S // 2 + 1, D]
            return x[:, ::2] * self.scale

        @staticmethod
        def input_schema(hidden_dim: int):
            from dmoe.core.experts import FREE, TensorSpec

            return [TensorSpec((FREE, FREE, hidden_dim))]

    import sys
    import types

    sys.modules["halve_for_tests"] = types.SimpleNamespace(Halve=Halve)
    try:
        b = backend("e.0", "halve_for_tests:Halve")
    finally:
        del sys.modules["halve_for_tests"]
    assert not b._shape_preserving
    assert b.output_shapes([(2, 9, HIDDEN)]) == [((2, 5, HIDDEN), "float32")]


def test_experts_added_and_removed_while_running():
    """An expert added later gets queues; one removed finishes what waits for it, refuses new tasks, and its
    queues (and backend) are forgotten once drained; added again, it is served again."""
    runtime = Runtime({"ffn.0": backend("ffn.0")}, max_batch_tokens=64, max_queued_tokens=64, batching=True)
    runtime.add_expert("ffn.1", backend("ffn.1"))
    waiting = task(torch.randn(3, HIDDEN))
    runtime.submit("ffn.1", waiting)  # queued before the thread starts: still waiting when removed
    runtime.remove_expert("ffn.1")
    with pytest.raises(Overloaded, match="no longer served"):
        runtime.submit("ffn.1", task(torch.randn(1, HIDDEN)))
    assert ("ffn.1", False) in runtime._queues  # not drained yet
    runtime.start()
    assert waiting.future.result(30)[0].shape == (3, HIDDEN)
    assert runtime.submit("ffn.0", task(torch.randn(2, HIDDEN))).result(30)[0].shape == (2, HIDDEN)
    assert ("ffn.1", False) not in runtime._queues and ("ffn.1", True) not in runtime._queues
    assert runtime.queued_tokens("ffn.1") == 0
    runtime.add_expert("ffn.1", backend("ffn.1"))
    assert runtime.submit("ffn.1", task(torch.randn(1, HIDDEN))).result(30)[0].shape == (1, HIDDEN)
    runtime.shutdown(10)


class _HeldStep(torch.optim.SGD):
    """SGD whose step waits until the test lets it go, and says when it started."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.started, self.go = threading.Event(), threading.Event()

    def step(self, closure=None):
        self.started.set()
        assert self.go.wait(30), "the test never let the step go"
        return super().step(closure)


def test_a_backward_is_answered_before_the_optimizer_step_and_no_later_call_runs_before_it():
    held: list[_HeldStep] = []

    def make_optimizer(params):
        held.append(_HeldStep(params, lr=0.5))
        return held[-1]

    module, input_schema = create_expert("ffn", uid="ffn.0", hidden_dim=HIDDEN)
    expert = ExpertBackend(
        "ffn.0", module=module, input_schema=input_schema, device=torch.device("cpu"),
        make_optimizer=make_optimizer, expert_cls="ffn", optimizer_name="sgd", max_grad_norm=0.0,
        max_batch_tokens=MAX_BATCH_TOKENS,
    )
    optimizer = held[-1]
    reference = create_expert("ffn", uid="ffn.0", hidden_dim=HIDDEN)[0]
    reference.load_state_dict(module.state_dict())
    with torch.no_grad():
        before = reference(x := torch.randn(4, HIDDEN))
    runtime = Runtime({"ffn.0": expert}, max_batch_tokens=1024, max_queued_tokens=4096, batching=True)
    runtime.start()
    try:
        grad = torch.randn(4, HIDDEN)
        backward = task(x.clone(), grad)  # (on the CPU the backend makes its inputs require grad)
        runtime.submit("ffn.0", backward)
        assert optimizer.started.wait(30), "the optimizer step never started"
        # the caller has its input gradients while the step is still held
        leaf = x.clone().requires_grad_()
        reference(leaf).backward(grad)
        torch.testing.assert_close(backward.future.result(5)[0], leaf.grad, rtol=1e-5, atol=1e-6)
        later = task(x)
        runtime.submit("ffn.0", later)
        assert not later.future.done() and expert.version == 0
        optimizer.go.set()
        after = later.future.result(30)[0]  # served after the step, with the stepped parameters
        assert expert.version == 1
        with torch.no_grad():
            for p in reference.parameters():
                p -= 0.5 * p.grad
            torch.testing.assert_close(after, reference(x), rtol=1e-5, atol=1e-6)
            assert not torch.allclose(after, before, rtol=1e-5, atol=1e-6)  # the step moved the output
    finally:
        optimizer.go.set()
        runtime.shutdown(10)
