#!/usr/bin/python3
"""Peer benchmark: PyTorch doing the per-step work of DistDiffusion's `swissroll` recipe.

Run with the system Python that Debian's python3-torch is built for (not a pyenv python3):

    scripts/peer/setup-peer.sh                                     # once: python3-torch + openblas-pthread
    /usr/bin/python3 scripts/peer/ddp_swissroll.py --mode single --threads 1
    /usr/bin/python3 scripts/peer/ddp_swissroll.py --mode single --threads 2
    /usr/bin/python3 scripts/peer/ddp_swissroll.py --mode ddp --world 2
    /usr/bin/python3 scripts/peer/ddp_swissroll.py --mode allreduce --allreduce-mib 64
    (add --json for one JSON object instead of the text line; --steps S, default 1500)

What is mirrored from the C# code (src/Model/Configuration/Recipes.cs `SwissRoll`, Recipe.cs defaults,
Networks/Mlp.cs, Networks/SinusoidalEmbedding.cs, Optimization/ExponentialMovingAverage.cs, Data/Synthetic2D.cs):
  data     swiss roll, 10,000 points: t = 1.5 pi (1 + 2u), (t cos t, t sin t) + N(0, 0.5^2), all / 10
           (coordinates within about [-1.4, 1.5]); each epoch a fresh permutation, global batch 256.
  process  T = 200, linear betas 1e-4..0.05; t ~ Uniform{0..T-1}; L_simple = MSE(eps_theta(x_t, t), eps).
  network  Mlp: sinusoidal embedding of t, width TimeEmbeddingSize (Recipe.cs default 64; the swissroll
           recipe does not override it) -> Linear(64, 256) + ReLU = temb; 4 hidden layers,
           h = ReLU(Linear((2 if l == 0 else 256) + 256, 256)(cat[h, temb])); output Linear(256, 2).
           477,442 parameters (dropout 0, fixed variance: no extra output).
  optim    Adam lr 2e-3, betas (0.9, 0.999), eps 1e-8, no weight decay, no clipping, no lr warm-up;
           EMA of the weights after every step with decay min(0.999, (1 + k) / (10 + k)) at step k (1-based).
Random draws (permutations, t, eps) use torch generators rather than the C# counter-based streams: the
work per step is the same, the numbers are not.

Modes
  single     one process, torch.set_num_threads(--threads).
  ddp        --world processes (torch.multiprocessing spawn), gloo on 127.0.0.1, 1 thread each,
             DistributedDataParallel; rank r trains on its slice of the global batch (256 / world samples),
             so the global batch stays 256; every rank keeps its own EMA (as DDP keeps its own weights).
  allreduce  --world processes time gloo all_reduce (sum) of an --allreduce-mib MiB float32 tensor.
Timing: --warmup steps (default 50) run first and are not timed; then --steps steps are timed.
Threads: OPENBLAS_NUM_THREADS is set (unless already set) to --threads in single mode and to 1 per DDP rank,
since torch.set_num_threads does not size Debian's OpenBLAS pool, which otherwise runs nproc threads.
On a busy machine (load above the core count) `--threads 2` with libgomp's default active waiting can be 10-40x
slower than 1 thread (seen here: 160-460 ms/step against 12-24 ms/step with 1 thread, at load 4.5-9 on 2 cores);
OMP_WAIT_POLICY=PASSIVE in the environment avoids that (22 ms/step at load ~5). The
script leaves it at the default and reports it in --json (omp_wait_policy) so figures say how they were taken.
"""

import argparse
import ctypes
import json
import math
import os
import socket
import sys
import time


def _blas_threads_from_argv(argv):
    """OpenBLAS threads for this run: --threads in single mode, 1 per process otherwise."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--mode", default="single")
    pre.add_argument("--threads", type=int, default=1)
    known, _ = pre.parse_known_args(argv)
    return max(1, known.threads) if known.mode == "single" else 1


# Debian's torch calls the BLAS through libblas.so.3 (openblas-pthread here), whose thread pool
# torch.set_num_threads does not size (BLAS_INFO=generic): it would run nproc threads next to torch's own
# (with --threads 1, or in each DDP rank). So size it before torch loads it, unless the caller did.
os.environ.setdefault("OPENBLAS_NUM_THREADS", str(_blas_threads_from_argv(sys.argv[1:])))

try:
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError as e:  # pragma: no cover - the point is the message
    sys.stderr.write(
        f"ddp_swissroll: cannot import torch with {sys.executable} ({e}).\n"
        "Run scripts/peer/setup-peer.sh (installs Debian's python3-torch and libopenblas0-pthread) and run this\n"
        "script with /usr/bin/python3: Debian's torch is built for the system Python, not a pyenv one.\n")
    sys.exit(3)

# ---- the swissroll recipe (src/Model/Configuration/Recipes.cs) ----
SYNTHETIC_SIZE = 10_000
SWISS_ROLL_NOISE = 0.5
TIMESTEPS = 200
BETA_START, BETA_END = 1e-4, 0.05
HIDDEN_SIZE = 256
HIDDEN_LAYERS = 4
TIME_EMBEDDING_SIZE = 64  # Recipe.TimeEmbeddingSize default; Recipes.SwissRoll does not set it
BATCH_SIZE = 256
LEARNING_RATE = 2e-3
EMA_DECAY = 0.999
DIM = 2


def csharp_mlp_parameter_count(dim=DIM, width=HIDDEN_SIZE, layers=HIDDEN_LAYERS, temb=TIME_EMBEDDING_SIZE,
                               learned_variance=False):
    """The parameter count of DistDiffusion's Mlp (Networks/Mlp.cs), written out from its constructor."""
    count = temb * width + width                                    # time_proj = Linear(temb, width)
    for l in range(layers):                                         # hidden[l] = Linear((l == 0 ? dim : width) + width, width)
        count += ((dim if l == 0 else width) + width) * width + width
    out = 2 * dim if learned_variance else dim
    count += width * out + out                                      # output = Linear(width, dim or 2 dim)
    return count


def sinusoidal_embedding(t, dim):
    """Networks/SinusoidalEmbedding.cs: freq_j = exp(-ln(10000) j / (half - 1)), [sin(t freq), cos(t freq)]."""
    half = dim // 2
    scale = math.log(10000.0) / max(half - 1, 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -scale)
    args = t.to(torch.float32).unsqueeze(1) * freqs.unsqueeze(0)
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class Mlp(nn.Module):
    """Networks/Mlp.cs with dropout 0 (the swissroll recipe's)."""

    def __init__(self, dim=DIM, width=HIDDEN_SIZE, layers=HIDDEN_LAYERS, temb=TIME_EMBEDDING_SIZE):
        super().__init__()
        self.temb_size = temb
        self.time_proj = nn.Linear(temb, width)
        self.hidden = nn.ModuleList(nn.Linear((dim if l == 0 else width) + width, width) for l in range(layers))
        self.output = nn.Linear(width, dim)

    def forward(self, x, t):
        temb = F.relu(self.time_proj(sinusoidal_embedding(t, self.temb_size)))
        h = x
        for layer in self.hidden:
            h = F.relu(layer(torch.cat([h, temb], dim=1)))
        return self.output(h)


def swiss_roll(n, seed):
    """Data/Synthetic2D.cs SwissRoll (drawn from a torch generator instead of DeterministicRandom)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    t = 1.5 * math.pi * (1 + 2 * u)
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64) * SWISS_ROLL_NOISE
    xy = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) + noise
    return (xy / 10.0).to(torch.float32).contiguous()


class BatchOrder:
    """Training/DataOrder.cs: epoch e is a permutation seeded by (seed, e); a batch takes the next B indices."""

    def __init__(self, n, seed):
        self.n, self.seed = n, seed
        self.epoch, self.pos = 0, 0
        self.perm = self._perm(0)

    def _perm(self, epoch):
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def next(self, b):
        parts = []
        while b > 0:
            if self.pos == self.n:
                self.epoch += 1
                self.pos = 0
                self.perm = self._perm(self.epoch)
            k = min(b, self.n - self.pos)
            parts.append(self.perm[self.pos:self.pos + k])
            self.pos += k
            b -= k
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class Ema:
    """Optimization/ExponentialMovingAverage.cs: ema = d ema + (1 - d) theta, d_k = min(decay, (1 + k) / (10 + k))."""

    def __init__(self, params, decay):
        self.params = list(params)
        self.decay = decay
        with torch.no_grad():
            self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step):
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p, alpha=1 - d)


def make_schedule():
    betas = torch.linspace(BETA_START, BETA_END, TIMESTEPS, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    return alpha_bar.sqrt().to(torch.float32), (1 - alpha_bar).sqrt().to(torch.float32)


def train(args, rank=0, world=1):
    """Runs warmup + steps training steps; returns (timed seconds, last loss, parameter count)."""
    torch.manual_seed(args.seed)                          # same initial weights on every rank
    data = swiss_roll(SYNTHETIC_SIZE, args.seed)
    order = BatchOrder(SYNTHETIC_SIZE, args.seed)         # every rank walks the same global order
    sqrt_ab, sqrt_1mab = make_schedule()
    model = Mlp()
    n_params = sum(p.numel() for p in model.parameters())
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ema = Ema(model.parameters(), EMA_DECAY)
    g = torch.Generator().manual_seed(args.seed * 7919 + 17 + rank)  # t and eps of this rank's samples
    local = args.batch // world
    lo = rank * local

    loss = torch.zeros(())
    start = None
    total = args.warmup + args.steps
    for step in range(1, total + 1):
        if step == args.warmup + 1:
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
        idx = order.next(args.batch)[lo:lo + local]
        x0 = data[idx]
        t = torch.randint(0, TIMESTEPS, (local,), generator=g)
        eps = torch.randn(local, DIM, generator=g)
        xt = sqrt_ab[t].unsqueeze(1) * x0 + sqrt_1mab[t].unsqueeze(1) * eps
        loss = F.mse_loss(net(xt, t), eps)                # DDP averages the ranks' gradients: global mean
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(step)
    if world > 1:
        dist.barrier()
    elapsed = time.perf_counter() - start if start is not None else 0.0
    return elapsed, float(loss), n_params


def blas_info():
    """(library, threads) of the BLAS that libblas.so.3 resolves to, as far as it can be asked."""
    lib = os.path.realpath("/usr/lib/x86_64-linux-gnu/libblas.so.3")
    try:
        threads = ctypes.CDLL("libopenblas.so.0").openblas_get_num_threads()
    except (OSError, AttributeError):
        threads = None
    return lib, threads


def report(args, mode, threads, world, elapsed, loss, n_params):
    sps = args.steps / elapsed if elapsed > 0 else float("nan")
    ms = 1000.0 * elapsed / args.steps if args.steps else float("nan")
    expected = csharp_mlp_parameter_count()
    if args.json:
        print(json.dumps({
            "peer": "pytorch", "torch": torch.__version__, "mode": mode, "threads": threads, "world": world,
            "steps": args.steps, "warmup": args.warmup, "batch": args.batch, "seconds": round(elapsed, 4),
            "steps_per_s": round(sps, 2), "ms_per_step": round(ms, 3), "params": n_params,
            "csharp_params": expected, "final_loss": round(loss, 5), "seed": args.seed,
            "blas": blas_info()[0], "blas_threads": blas_info()[1],
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "loadavg_1min": os.getloadavg()[0], "cpus": os.cpu_count(),
        }))
    else:
        print(f"peer {mode} threads={threads} world={world}: {sps:.1f} steps/s ({ms:.2f} ms/step), params={n_params}")
    _, bt = blas_info()
    if bt is not None and bt != threads:
        sys.stderr.write(f"ddp_swissroll: note: OpenBLAS runs {bt} threads per process (OPENBLAS_NUM_THREADS)\n")
    if n_params != expected:
        sys.stderr.write(f"ddp_swissroll: WARNING: {n_params} parameters but the C# Mlp has {expected}\n")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_rank(rank, world, port):
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def ddp_worker(rank, args, port):
    init_rank(rank, args.world, port)
    try:
        elapsed, loss, n_params = train(args, rank, args.world)
        # The slowest rank's time is the step time.
        t = torch.tensor([elapsed], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if rank == 0:
            report(args, "ddp", 1, args.world, float(t.item()), loss, n_params)
            sys.stdout.flush()
    finally:
        dist.destroy_process_group()


def allreduce_worker(rank, args, port):
    init_rank(rank, args.world, port)
    try:
        n = args.allreduce_mib * 1024 * 1024 // 4
        x = torch.ones(n, dtype=torch.float32)
        for _ in range(args.allreduce_warmup):
            dist.all_reduce(x)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.allreduce_iters):
            dist.all_reduce(x)
        elapsed = time.perf_counter() - start
        t = torch.tensor([elapsed], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        elapsed = float(t.item())
        if rank == 0:
            per = elapsed / args.allreduce_iters
            rate = args.allreduce_mib / per
            if args.json:
                print(json.dumps({
                    "peer": "pytorch", "torch": torch.__version__, "mode": "allreduce", "backend": "gloo",
                    "world": args.world, "mib": args.allreduce_mib, "iters": args.allreduce_iters,
                    "ms_per_allreduce": round(1000 * per, 2), "mib_per_s_per_process": round(rate, 1),
                    "loadavg_1min": os.getloadavg()[0], "cpus": os.cpu_count(),
                }))
            else:
                print(f"peer allreduce world={args.world}: {args.allreduce_mib} MiB float32 gloo all_reduce "
                      f"{1000 * per:.1f} ms = {rate:.0f} MiB/s per process ({args.allreduce_iters} iterations)")
            sys.stdout.flush()
    finally:
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description="PyTorch peer of DistDiffusion's swissroll training step")
    p.add_argument("--mode", choices=["single", "ddp", "allreduce"], default="single")
    p.add_argument("--threads", type=int, default=1, help="single: torch.set_num_threads (default 1)")
    p.add_argument("--world", type=int, default=2, help="ddp / allreduce: processes (default 2)")
    p.add_argument("--steps", type=int, default=1500, help="timed training steps (default 1500)")
    p.add_argument("--warmup", type=int, default=50, help="untimed steps before them (default 50)")
    p.add_argument("--batch", type=int, default=BATCH_SIZE, help="global batch (default 256, the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allreduce-mib", type=int, default=64, help="allreduce: tensor size in MiB (default 64)")
    p.add_argument("--allreduce-iters", type=int, default=10, help="allreduce: timed all_reduce calls (default 10)")
    p.add_argument("--allreduce-warmup", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text line")
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.threads < 1 or args.world < 1:
        p.error("--steps and --threads must be >= 1, --warmup >= 0, --world >= 1")
    if args.mode in ("ddp", "allreduce") and args.world < 2:
        p.error(f"--mode {args.mode} needs --world >= 2")
    if args.mode == "ddp" and args.batch % args.world:
        p.error(f"--batch {args.batch} is not divisible by --world {args.world}")
    if args.mode != "single" and not (dist.is_available() and dist.is_gloo_available()):
        sys.stderr.write("ddp_swissroll: this torch has no torch.distributed gloo backend\n")
        sys.exit(3)

    if args.mode == "single":
        torch.set_num_threads(args.threads)
        elapsed, loss, n_params = train(args)
        report(args, "single", torch.get_num_threads(), 1, elapsed, loss, n_params)
    else:
        port = free_port()
        worker = ddp_worker if args.mode == "ddp" else allreduce_worker
        mp.spawn(worker, args=(args, port), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
