"""The compressions of tensors on the wire, by the names users give them (``--compression``), and their
wire codes. Apart from :mod:`dmoe.core.wire` so that configs can check a name without importing torch."""

from __future__ import annotations

from dmoe.proto import expert_pb2 as pb

COMPRESSION_NAMES: dict[str, int] = {"none": pb.NONE, "fp16": pb.FLOAT16, "8bit": pb.UNIFORM_8BIT}
