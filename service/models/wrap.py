"""``unwrap``: the plain model inside the DDP / DataParallel / ``torch.compile`` wrappers."""

from __future__ import annotations

from torch import nn


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside DDP (``.module``) / ``torch.compile`` (``._orig_mod``) wrappers.

    Wrappers nest (a compiled DDP model), so peel until none is left; any other module is
    returned as it is. Use it wherever state is read or copied: ``state_dict`` keys, the MoCo
    key encoder, the registered backbone.

    >>> from torch import nn
    >>> net = nn.Linear(2, 2)
    >>> unwrap(nn.DataParallel(net)) is net, unwrap(net) is net
    (True, True)
    """
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel | nn.DataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module
