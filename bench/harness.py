"""The sandbox process harness the benchmarks use: it lives with the sandbox
(worker.sandbox.process), so the tests need not import bench."""

from __future__ import annotations

from worker.sandbox.process import SandboxProc, max_in_window, start_sandbox

__all__ = ["SandboxProc", "max_in_window", "start_sandbox"]
