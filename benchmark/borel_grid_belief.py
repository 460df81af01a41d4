"""GridNavi BOReL run: per test goal, the cells visited in episode 1 by the final policy and the decoder's goal
probabilities (softmax over cells of the belief mean) at the end of episode 1.

    python benchmark/borel_grid_belief.py runs/benchmark/GridNavi__borel__s1

Printed grids: rows y from the top down, columns x from the left, percent."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import borel
from common.envs import make_family
from common.runs import args_from_saved
torch.set_num_threads(1)
run = sys.argv[1]
st = torch.load(f"{run}/checkpoint.pt", map_location="cpu", weights_only=False)
args = borel.resolve_args(args_from_saved(borel.Args, st["args"]))
fam = make_family(args.env_id, args.preset); k = fam.episodes_per_task; H = fam.horizon; n = fam.config["size"]
vae, nets, _ = borel.make_nets(fam, args, k, "cpu")
vae.load_state_dict(st["vae"])
for key, net in nets.items():
    net.load_state_dict(st["nets"][key])
ids = fam.test_idx
venv = fam.make_vec_env(ids, 1, seed=3); B = venv.num_envs
h = torch.zeros(1, B, vae.gru.hidden_size)
visited = [set() for _ in range(B)]
obs = venv.reset()
with torch.no_grad():
    for t in range(H):
        bel = borel.policy_belief(vae, torch.cat(vae.heads(h[0]), -1), args.belief_input)
        a = borel.act_on(nets, torch.cat([torch.as_tensor(obs, dtype=torch.float32), bel], -1), True)
        nobs, r, *_ = venv.step(a.numpy())
        for i in range(B):
            visited[i].add(tuple(int(v) for v in nobs[i]))
        bit = torch.full((1, B, 1), float(t == H - 1))
        _, _, h = vae.encode(a[None], torch.as_tensor(nobs, dtype=torch.float32)[None], torch.as_tensor(r, dtype=torch.float32)[None], bit, h)
        obs = nobs
    mu = vae.heads(h[0])[0]
    p = torch.softmax(vae.dec(mu), -1).numpy()  # (B, cells)
for i in (0, 8, 12):  # a border goal and interior ones
    g = tuple(int(v) for v in fam.tasks[ids[i]])
    print("goal", g, "visited in ep1:", sorted(visited[i]))
    print((p[i].reshape(n, n) * 100).round(0).T[::-1])  # rows: y from 4 down to 0, columns x
