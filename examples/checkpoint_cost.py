"""Time one epoch-end checkpoint of a T5-base-sized GRU/256 side network (1.97 M trainable parameters).

    python examples/checkpoint_cost.py /tmp/ckpt     # prints its size and the time of 5 saves (with fsync)
"""
import copy
import sys
import time
from pathlib import Path

import torch

from read_cache.tasks.specs import get_task
from read_cache.training import checkpoint
from read_cache.training.engine import EarlyStopping, Member
from read_cache.training.side_network import SideNetwork, SideNetworkConfig

out = Path(sys.argv[1])
out.mkdir(exist_ok=True)
net = SideNetwork(SideNetworkConfig(rnn="gru", dim=256, d_model=768, head="linear", num_labels=2))
opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad])
loss = sum((p**2).sum() for p in net.parameters() if p.requires_grad)
loss.backward()
opt.step()
stopping = EarlyStopping(get_task("sst2"), 5, snapshot=lambda: copy.deepcopy(net.state_dict()), restore=net.load_state_dict)
member = Member("", stopping, opt, lambda batch, weight: 0.0)
times = []
for _ in range(5):
    t = time.perf_counter()
    checkpoint.save_members(out, "train", 1, [member], [])
    times.append(time.perf_counter() - t)
size = (out / "checkpoint.pt").stat().st_size
print(f"params {sum(p.numel() for p in net.parameters() if p.requires_grad):,}; checkpoint {size/1e6:.1f} MB; save {min(times)*1e3:.0f}-{max(times)*1e3:.0f} ms (5 saves)")
