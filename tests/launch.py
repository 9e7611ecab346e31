"""Helpers of the tests that launch real processes (torchrun, deepspeed, the scripts): a free port, and the part of
the ranks' stderr that says why one failed."""
import socket

NOISE = ("Warning: `torch.distributed.", "return func(*args, **kwargs)", "Setting accelerator to CPU",
         "deepspeed_shm_comm_op built successfully")


def free_port() -> int:
    """A TCP port nothing listens on now (for --master_port / MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def failure_text(stderr: str, limit: int = 8000) -> str:
    """The ranks' stderr without the lines every run prints (the deprecation warnings of deepspeed's collectives,
    the accelerator notice), so the line that says why a rank died (a C++ `terminate called ...`, a Python
    traceback) is not pushed out of the tail a failed assertion shows."""
    return "\n".join(line for line in stderr.splitlines() if not any(n in line for n in NOISE))[-limit:]
