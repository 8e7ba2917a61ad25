"""Writes the fixtures for zoo/weight_files.py: files torch and safetensors themselves wrote.

  tests/fixtures/torch_weights.pth          torch.save of a training-style checkpoint:
                                            {"state_dict": OrderedDict, "epoch": 3}, with
                                            float32/float16/bfloat16/int64/bool tensors, an
                                            nn.Parameter, a transposed (non-contiguous) view,
                                            two views sharing one storage, an empty tensor and a
                                            0-d tensor
  tests/fixtures/torch_weights.safetensors  safetensors.torch.save_file of the same tensors
                                            (made contiguous; safetensors refuses shared storage)
  tests/fixtures/torch_weights_expected.npz the values, as float64/int64/bool numpy arrays, and
                                            each tensor's torch dtype name

`tests/training/test_weight_files.py` reads both files with `zoo.weight_files.load_state_dict`
(which needs neither torch nor safetensors) and compares. Needs torch and safetensors, which the
project does not depend on; run it from a separate venv:

  /tmp/timmenv/bin/python tools/make_weight_file_fixture.py
"""
from __future__ import annotations

import argparse
import collections
import pathlib

import numpy as np
import safetensors.torch
import torch


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    shared = torch.arange(12, dtype=torch.float32)
    return collections.OrderedDict([
            ("encoder.weight", torch.randn(3, 5, generator=g)),
            ("encoder.weight_t", base.t()),  # stride (1, 6): read through the strides
            ("encoder.half", torch.randn(2, 3, generator=g).half()),
            ("encoder.bf16", torch.randn(2, 3, generator=g).bfloat16()),
            ("encoder.param", torch.nn.Parameter(torch.randn(5, generator=g))),
            ("encoder.index", torch.arange(7, dtype=torch.int64) * 3 - 5),
            ("encoder.mask", torch.tensor([True, False, True])),
            ("shared.head", shared[:6].view(2, 3)),  # both views of one storage, at an offset
            ("shared.tail", shared[6:].view(3, 2)),
            ("empty", torch.zeros(0, 4)),
            ("scalar", torch.tensor(2.5)),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent.parent / "tests" /
                                              "fixtures"))
    out = pathlib.Path(parser.parse_args().out)
    state = tensors()
    torch.save({"state_dict": state, "epoch": 3}, out / "torch_weights.pth")
    safetensors.torch.save_file({k: v.detach().contiguous().clone() for k, v in state.items()},
                                str(out / "torch_weights.safetensors"),
                                metadata={"source": "tools/make_weight_file_fixture.py"})
    expected = {}
    for name, value in state.items():
        value = value.detach()
        kind = ("bool" if value.dtype == torch.bool else
                "int" if not value.dtype.is_floating_point else "float")
        as_numpy = {"bool": lambda: value.numpy(), "int": lambda: value.to(torch.int64).numpy(),
                    "float": lambda: value.to(torch.float64).numpy()}[kind]()
        expected[f"value/{name}"] = as_numpy
        expected[f"dtype/{name}"] = np.array(str(value.dtype).removeprefix("torch."))
    np.savez(out / "torch_weights_expected.npz", **expected)
    print(f"wrote torch_weights.pth, torch_weights.safetensors and torch_weights_expected.npz "
          f"to {out} (torch {torch.__version__}, safetensors {safetensors.__version__})")


if __name__ == "__main__":
    main()
