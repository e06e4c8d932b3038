"""HostReads: counts host reads of tensor data, the CPU stand-in for CUDA's sync debug mode.

bool(t), t.item(), t.tolist(), int(t), float(t) each copy device data to the host (a sync on CUDA); a
CUDA-graph capture raises on one, and a decode loop pays one per call. Used as a pytest fixture helper:
``reads = HostReads(monkeypatch)`` then ``reads.calls`` lists the reads made since, by name.
"""
import torch


class HostReads:
    NAMES = ("__bool__", "item", "tolist", "__int__", "__float__")

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self._counted(getattr(torch.Tensor, name), name))

    def _counted(self, real, name):
        def counted(t, *args, **kwargs):
            self.calls.append(name)
            return real(t, *args, **kwargs)
        return counted
