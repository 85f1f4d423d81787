"""Runs the PyTorch anchor (../shared/anchors/sofo_torch.py) on the GPU.

The anchor builds its tensors with torch's default device and times
iterations without synchronising; here the default device is CUDA and every
timed iteration ends with torch.cuda.synchronize(), so the time is the GPU's.
Usage: python anchor_torch_gpu.py ANCHOR_DIR bench --method adam --N 128 ...
"""
import sys

anchors, argv = sys.argv[1], sys.argv[2:]
sys.path.insert(0, anchors)

import torch  # noqa: E402

torch.set_default_device("cuda")

import anchor_common as ac  # noqa: E402

_timed_loop = ac.timed_loop
_emit = ac.emit


def timed_loop(step_once, *args, **kwargs):
    def synced():
        step_once()
        torch.cuda.synchronize()

    return _timed_loop(synced, *args, **kwargs)


def emit(rec, as_json=True):
    rec["device"] = torch.cuda.get_device_name(0)
    rec["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    _emit(rec, as_json)


ac.timed_loop = timed_loop
ac.emit = emit

import sofo_torch  # noqa: E402

sofo_torch.main(argv)
