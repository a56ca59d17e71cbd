"""The torch back end of ``examples/train.py``: the same MLP, loss and Adam as its numpy one.

Used by every rank when ``--backend torch`` (or ``auto`` with torch installed). CPU only,
one thread, so that a run and its restarted twin compute bit-for-bit the same sums.
"""
import numpy as np
import torch


class TorchMLP:
    """``features -> hidden (tanh, dropout 0.1) -> outputs`` with ``torch.optim.Adam``."""

    def __init__(self, args, rank):
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        torch.manual_seed(args.seed)                           # the same initial weights on every rank
        self.net = torch.nn.Sequential(torch.nn.Linear(args.features, args.hidden), torch.nn.Tanh(),
                                       torch.nn.Dropout(0.1), torch.nn.Linear(args.hidden, args.outputs))
        self.params = list(self.net.parameters())
        self.size = sum(p.numel() for p in self.params)
        self.optim = torch.optim.Adam(self.params, lr=args.lr)
        torch.manual_seed(args.seed * 1000 + 7 + rank)          # this rank's dropout stream

    def stateful(self):
        from veloc.training import TorchRNGState
        return {"model": self.net, "optim": self.optim, "rng": TorchRNGState()}

    def gradients(self, x, y, flat):
        """Loss of the batch; its gradients go into ``flat`` (in parameter order)."""
        self.optim.zero_grad(set_to_none=False)
        loss = torch.nn.functional.mse_loss(self.net(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        offset = 0
        for p in self.params:
            n = p.numel()
            flat[offset:offset + n] = p.grad.reshape(-1).numpy()
            offset += n
        return loss.item()

    def update(self, flat):
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad.copy_(torch.from_numpy(np.ascontiguousarray(flat[offset:offset + n])).reshape(p.shape))
            offset += n
        self.optim.step()

    def weights_bytes(self):
        return b"".join(p.detach().numpy().tobytes() for p in self.params)
