"""Command-line argument types shared by the tools (cli, demo, calibrate): one module that imports
neither vLLM nor any tool, so no tool imports another to parse its flags."""

from __future__ import annotations

import argparse


def ratio_arg(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number in (0, 1], got {text!r}") from None
        if not 0.0 < value <= 1.0:
            raise argparse.ArgumentTypeError(f"{name} must be in (0, 1], got {value}")
        return value

    return parse
