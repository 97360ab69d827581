"""One status line on a terminal for long work (kernel generation, autotuning); silent otherwise."""
import sys


def progress(message: str) -> None:
    stream = sys.stderr
    if not stream.isatty():
        return
    stream.write("\r\033[K" + (f"[deepfuse] {message}" if message else ""))
    stream.flush()
