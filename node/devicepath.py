"""How a batch travels between the host and the device: :func:`stage` (host -> device), :func:`to_host`
(device -> host), and the copy stream that lets the next batch's copy overlap the current batch's compute.

On the CPU both are what they were before this module existed: the tasks' tensors concatenated, and the
outputs as they are. On CUDA:

* a batch is concatenated straight into pinned (page-locked) host memory, from torch's caching host
  allocator (so a block is reused once the copies that read it have ended, not allocated per batch), and
  copied to the device with a non-blocking copy on a side stream, the *copy stream*, ending in an event;
* the compute, on the device's current stream, waits for that event only when it takes the batch
  (:meth:`Staged.wait`), and the staged tensors are marked as used by that stream, so the allocator never
  hands their memory to anything else before the compute that reads them has ended;
* outputs come back with non-blocking copies into pinned host memory and one wait for all of them.

So while batch N computes, the runtime can stage batch N+1 (see :class:`dmoe.node.runtime.Runtime`): its
copy runs on the copy stream, concurrently with N's kernels on the compute stream.
"""

from __future__ import annotations

import dataclasses
import threading

import torch

_copy_streams: dict[torch.device, torch.cuda.Stream] = {}
_streams_lock = threading.Lock()


def copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream host -> device copies of ``device`` (a CUDA device) run on: one per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    device = torch.device(device.type, index)
    with _streams_lock:
        if device not in _copy_streams:
            _copy_streams[device] = torch.cuda.Stream(device)
        return _copy_streams[device]


@dataclasses.dataclass(slots=True)
class Staged:
    """A batch's tensors on their device: ``inputs`` and, for a backward, ``grad_outputs``. On CUDA
    they may still be in flight on the copy stream until :meth:`wait`."""

    inputs: list[torch.Tensor]
    grad_outputs: list[torch.Tensor] | None
    copied: torch.cuda.Event | None = None  # the end of the copies, on the copy stream (None: no copy)

    def wait(self) -> None:
        """Make the current stream wait for the copies (without blocking the host), and mark the tensors
        as used by it. Call on the thread that computes, before computing; a no-op on the CPU."""
        if self.copied is None:
            return
        stream = torch.cuda.current_stream(self.inputs[0].device)
        stream.wait_event(self.copied)
        for tensor in (*self.inputs, *(self.grad_outputs or ())):
            tensor.record_stream(stream)
        self.copied = None


def stage(per_task_inputs: list[list[torch.Tensor]], per_task_grads: list[list[torch.Tensor]] | None,
          device: torch.device) -> Staged:
    """The tasks' tensors, concatenated along the first dimension (one list per task, in task order),
    on ``device``. On the CPU: :func:`concat`, no copy. On CUDA: through pinned memory with
    non-blocking copies on the copy stream; call :meth:`Staged.wait` before using them."""
    if device.type != "cuda":
        return Staged(concat(per_task_inputs), None if per_task_grads is None else concat(per_task_grads))
    stream = copy_stream(device)
    pinned_inputs = _pinned_concat(per_task_inputs)
    pinned_grads = None if per_task_grads is None else _pinned_concat(per_task_grads)
    with torch.cuda.stream(stream):
        inputs = [t.to(device, non_blocking=True) for t in pinned_inputs]
        grads = None if pinned_grads is None else [t.to(device, non_blocking=True) for t in pinned_grads]
        copied = torch.cuda.Event()
        copied.record(stream)
    return Staged(inputs, grads, copied)


def to_host(tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """``tensors`` on the host: on CUDA, non-blocking copies into pinned memory on the current stream,
    then one wait for them all; tensors already on the host are returned as they are."""
    on_device = [t for t in tensors if t.device.type == "cuda"]
    if not on_device:
        return [t.cpu() for t in tensors]
    hosted = []
    for tensor in tensors:
        if tensor.device.type != "cuda":
            hosted.append(tensor)
            continue
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        hosted.append(host)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(on_device[0].device))
    done.synchronize()
    return hosted


def concat(per_task: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """The tasks' tensors concatenated along the first dimension (a single task's as they are)."""
    if len(per_task) == 1:
        return per_task[0]
    return [torch.cat(tensors) for tensors in zip(*per_task)]


def _pinned_concat(per_task: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    merged = []
    for parts in zip(*per_task):
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        pinned = torch.empty(shape, dtype=parts[0].dtype, pin_memory=True)
        if len(parts) == 1:
            pinned.copy_(parts[0])
        else:
            torch.cat(parts, out=pinned)
        merged.append(pinned)
    return merged
