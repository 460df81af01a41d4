"""The CPU-sized reference settings of the benchmark, one entry per (method, env_id).

``benchmark/run.py --method M --env E`` looks up ``SETTINGS[(M, E)]`` and runs, per seed,

    python M.py --env-id E --preset {preset} --seed S --run-dir ... --total-steps {steps} {args...}

Each method's issue adds its entries here (reduced sizes that fit 2 CPU cores, not the paper's scale):
    preset  the task preset of ``common/envs.py``
    args    extra CLI flags of the method script (do not repeat --total-steps: it comes from ``steps``)
    steps   gradient steps of the main phase (--total-steps)
    note    one line: what was reduced and why, the expected wall time
    script  (variants only) the method script when the key names a variant, e.g. "pearl" for "pearl-relabel";
            the script's summary then carries the same variant name, so the two rows sit apart in the report
"""

SETTINGS: dict[tuple[str, str], dict] = {
    ("pearl", "PointRobot"): {
        "preset": "default",
        "args": ["--eval-every", "1000", "--net-size", "128", "--encoder-size", "128", "--bf16", "--no-cuda"],
        "steps": 10_000,
        "note": "offline PEARL, nets 3x128 and encoder 3x128 (paper 300/200), bf16 autocast, 10k of the paper's "
                "500k steps; run with OMP_NUM_THREADS=1 (CPU shared); ~10 min per seed",
    },
    ("pearl", "HalfCheetahVel"): {
        "preset": "cpu",
        "args": ["--eval-every", "4000", "--net-size", "128", "--encoder-size", "128", "--bf16", "--no-cuda"],
        "steps": 40_000,
        "note": "offline PEARL on the CPU-sized cheetah dataset (20/10 tasks), nets 3x128 (paper 300/200), bf16, "
                "40k of the paper's 1M steps; ~60 min on one shared core",
    },
    ("pearl-relabel", "PointRobot"): {
        "script": "pearl",
        "preset": "default",
        "args": ["--context-relabel", "1.0", "--relabel-mode", "pool", "--eval-every", "1000", "--net-size", "128", "--encoder-size", "128",
                 "--bf16", "--no-cuda"],
        "steps": 10_000,
        "note": "as pearl/PointRobot plus --context-relabel 1.0 --relabel-mode pool (training contexts: transitions of "
                "random train tasks with this task's rewards, so only rewards identify the task); ~10 min per seed",
    },
    ("pearl-relabel-rlrelabel", "PointRobot"): {
        "script": "pearl",
        "preset": "default",
        "args": ["--context-relabel", "1.0", "--relabel-mode", "task", "--rl-relabel", "0.5", "--eval-every", "2500",
                 "--net-size", "128", "--encoder-size", "128", "--no-cuda"],
        "steps": 20_000,
        "note": "as pearl/PointRobot in fp32, plus relabelled contexts (one other train task's data with this task's "
                "rewards) and half of each RL batch from all train tasks' data with this task's rewards; "
                "~30 min per seed on one shared core",
    },
    ("pearl-online", "PointRobot"): {
        "script": "pearl",
        "preset": "default",
        "args": ["--online", "--eval-every", "5000", "--net-size", "128", "--encoder-size", "128", "--no-cuda"],
        "steps": 100_000,
        "note": "the paper's online PEARL (point-robot column: 5 tasks x (200 prior-z + 200 posterior-z) env steps and "
                "1000 updates per iteration), no dataset; nets 3x128 (paper 300/200) in fp32, 100k of the paper's 500k "
                "updates; ~2.5 h per seed on one shared core",
    },
    ("macaw", "PointRobot"): {
        "preset": "default",
        "args": ["--eval-every", "250", "--no-cuda"],
        "steps": 3_000,
        "note": "MACAW at the paper's sizes (width 100, WLinear, 5 tasks x 256 rows), buffer skip 1, 3k of the "
                "paper's ~1M meta-steps (spec §9: 2k-4k); ~8 min per seed on one shared core",
    },
    ("macaw", "HalfCheetahVel"): {
        "preset": "cpu",
        "args": ["--eval-every", "2000", "--no-cuda"],
        "steps": 30_000,
        "note": "MACAW at the paper's sizes on the CPU-sized cheetah dataset (20/10 tasks, skip 7 as the paper), "
                "30k of the paper's ~1M meta-steps; ~70 min on one shared core",
    },
    ("macaw-randinner", "HalfCheetahVel"): {
        "script": "macaw",
        "preset": "cpu",
        "args": ["--no-contiguous", "--eval-every", "2000", "--no-cuda"],
        "steps": 30_000,
        "note": "as macaw/HalfCheetahVel with random inner batches (official: contiguous windows), so the inner step "
                "sees the same kind of batch in training as at test; ~70 min on one shared core",
    },
    ("macaw-randinner-skip1", "HalfCheetahVel"): {
        "script": "macaw",
        "preset": "cpu",
        "args": ["--no-contiguous", "--buffer-skip", "1", "--eval-every", "2000", "--no-cuda"],
        "steps": 30_000,
        "note": "as macaw-randinner with every row of the buffers kept (skip 1 against the paper's 7: the CPU "
                "dataset has 32k rows per task, the paper's ~1M); ~70 min on one shared core",
    },
    ("macaw-randinner-skip1-vlr0.0001", "HalfCheetahVel"): {
        "script": "macaw",
        "preset": "cpu",
        "args": ["--no-contiguous", "--buffer-skip", "1", "--outer-value-lr", "1e-4", "--eval-every", "2000", "--no-cuda"],
        "steps": 30_000,
        "note": "as macaw-randinner-skip1 with the value net's outer lr 1e-4 (official 1e-5, tuned for ~1M steps: at "
                "30k steps the value net lags the cheetah's raw returns); ~60 min on one shared core",
    },
    ("macaw-randinner-skip1-T0.5", "HalfCheetahVel"): {
        "script": "macaw",
        "preset": "cpu",
        "args": ["--no-contiguous", "--buffer-skip", "1", "--adaptation-temp", "0.5", "--eval-every", "2000", "--no-cuda"],
        "steps": 30_000,
        "note": "as macaw-randinner-skip1 with AWR temperature 0.5 (official 1; advantages are batch-normalised, so "
                "T 1 caps the weights near exp(3) and the mixed-quality buffers are nearly cloned); ~60 min on one shared core",
    },
    ("corro-relabel-rq", "PointRobot"): {
        "script": "corro",
        "preset": "default",
        "args": ["--negatives", "relabel", "--relabel-queries", "--encoder-steps", "20000", "--eval-every", "2000",
                 "--no-cuda"],
        "steps": 60_000,
        "note": "CORRO with the relabelling options (the paper's CVAE negatives collapse on this data, see README), "
                "20k of the paper's 200k InfoNCE updates and 60k of its 200k SAC updates; ~45 min per seed on one "
                "shared core",
    },
    ("smac", "PointRobot"): {
        "preset": "default",
        "args": ["--eval-every", "1000", "--online-iterations", "10", "--online-updates", "500",
                 "--online-eval-every", "5", "--no-cuda"],
        "steps": 10_000,
        "note": "SMAC at the paper's sizes (nets 3x300, encoder 3x200, meta-batch 4 x 128), KL 0.001 (the point-robot "
                "override), 10k of the paper's 50k offline steps, then 10 of 51 self-supervised iterations x 500 of "
                "16,000 updates (5k reward-free env steps); ~30 min per seed on one shared core",
    },
    ("smac-oracle", "PointRobot"): {
        "script": "smac",
        "preset": "default",
        "args": ["--oracle-rewards", "--eval-every", "1000", "--online-iterations", "10", "--online-updates", "500",
                 "--online-eval-every", "5", "--no-cuda"],
        "steps": 10_000,
        "note": "as smac/PointRobot with true rewards in the online phase (the paper's online oracle)",
    },
    ("smac-relabel-beta1", "PointRobot"): {
        "script": "smac",
        "preset": "default",
        "args": ["--relabel-offline", "all", "--beta", "1", "--kl-lambda", "0.01", "--eval-every", "1000",
                 "--online-iterations", "10", "--online-updates", "500", "--online-eval-every", "5", "--no-cuda"],
        "steps": 10_000,
        "note": "as smac/PointRobot with every train task's buffer holding all train tasks' rows relabelled with its "
                "rewards (the official, unused relabel_offline_dataset), AWR beta 1 (100 imitates the other tasks' "
                "actions) and KL 0.01; ~30 min per seed on one shared core",
    },
    ("smac-relabeldec", "PointRobot"): {
        "script": "smac",
        "preset": "default",
        "args": ["--decoder-batch", "relabelled", "--eval-every", "1000", "--online-iterations", "10",
                 "--online-updates", "500", "--online-eval-every", "5", "--no-cuda"],
        "steps": 10_000,
        "note": "as smac/PointRobot with the reward decoder reconstructing a second batch of all train tasks' rows "
                "relabelled with the task's rewards (RL batches and contexts stay the task's own rows); 59 min per "
                "seed with four to six runs sharing the 2-core CPU",
    },
    ("smac-relabelctx-task-relabeldec", "PointRobot"): {
        "script": "smac",
        "preset": "default",
        "args": ["--relabel-offline", "context", "--relabel-context-source", "task", "--decoder-batch", "relabelled",
                 "--eval-every", "1000", "--online-iterations", "10", "--online-updates", "500",
                 "--online-eval-every", "5", "--no-cuda"],
        "steps": 10_000,
        "note": "as smac-relabeldec/PointRobot with each training context drawn from one random train task's rows "
                "relabelled with the task's rewards (like one exploration episode), so the encoder must read rewards; "
                "41-48 min per seed with three to six runs sharing the 2-core CPU",
    },
    ("mql", "PointRobot"): {
        "preset": "default",
        "args": ["--eval-every", "2500", "--adapt-every", "20000", "--no-cuda"],
        "steps": 40_000,
        "note": "MQL at the paper's sizes (actor/critics 300x300, GRU 15, H 10, batch 256, lr 1e-3), 40k TD3 updates "
                "(spec §9: 20k-40k); adaptation (n 10, m 100 on 5 x 256 rows per test task) evaluated at 0, 20k and "
                "40k, zero-shot every 2.5k; ~25 min per seed on one shared core",
    },
    ("mql-relabel", "PointRobot"): {
        "script": "mql",
        "preset": "default",
        "args": ["--relabel", "1.0", "--eval-every", "2500", "--adapt-every", "20000", "--no-cuda"],
        "steps": 40_000,
        "note": "as mql/PointRobot with every meta-training episode relabelled with a random train task's rewards "
                "(transition and histories), so only rewards identify the task; ~25 min per seed on one shared core",
    },
    ("mql-online", "PointRobot"): {
        "script": "mql",
        "preset": "default",
        "args": ["--online", "--eval-every", "2500", "--adapt-every", "20000", "--no-cuda"],
        "steps": 40_000,
        "note": "the paper's online MQL loop (random cold start of 10k steps, then 5 exploration episodes and 100 updates "
                "per iteration), no dataset in training (mode A still draws its D_new from the test tasks' data); "
                "40k updates = 50k env steps; ~25 min per seed on one shared core",
    },
    ("borel", "GridNavi"): {
        "preset": "borel",
        "args": ["--eval-every", "2500", "--no-cuda"],
        "steps": 250_000,
        "note": "BOReL at the paper's sizes and budget (30.6k transitions per task, VAE 100 epochs = 19.2k updates, "
                "DQN 64x2, 16 tasks x 256, 1000 x 250 DQN updates); ~55 min per seed on one shared core",
    },
    ("borel", "PointRobot"): {
        "preset": "default",
        "args": ["--eval-every", "2000", "--no-cuda"],
        "steps": 30_000,
        "note": "BOReL on the shared PointRobot dataset (k = 1 episode of 20 steps): VAE 100 epochs, SAC 128x2, "
                "gamma 0.9, alpha 0.01; 30k of the paper's 5M SAC updates; ~47 min on one shared core",
    },
    ("borel", "SparsePointRobot"): {
        "preset": "borel",
        "args": ["--vae-epochs", "5", "--vae-rollouts-per-task", "2", "--eval-every", "5000", "--no-cuda"],
        "steps": 30_000,
        "note": "BOReL on the paper's sparse semicircle (100 goals, 80 / 20, k = 2 episodes of 60 steps): VAE 5 epochs "
                "of 8 tasks x 2 rollouts (3.9k updates; official 100 epochs of 8 x 8), SAC 128x2, gamma 0.9, alpha 0.01, "
                "30k of the paper's 5M SAC updates; ~50 min per seed on one shared core",
    },
    ("borel-norelabel", "SparsePointRobot"): {
        "script": "borel",
        "preset": "borel",
        "args": ["--no-relabel", "--vae-epochs", "5", "--vae-rollouts-per-task", "2", "--eval-every", "5000", "--no-cuda"],
        "steps": 30_000,
        "note": "the paper's ablation on the sparse semicircle: the VAE trained without reward relabelling; otherwise as "
                "borel/SparsePointRobot",
    },
    ("borel-norelabel", "HalfCheetahVel"): {
        "script": "borel",
        "preset": "cpu",
        "args": ["--no-relabel", "--vae-epochs", "50", "--elbo-latents", "20", "--batch-size", "64", "--eval-every", "5000",
                 "--no-cuda"],
        "steps": 40_000,
        "note": "BOReL on the CPU-sized cheetah data (20 train / 10 test velocities, k = 1 episode of 200 steps) without "
                "RR, as the official cheetah config: VAE 50 of 100 epochs (5k updates of 4 tasks x 8 rollouts) with 20 "
                "random latents per rollout in the reconstruction, SAC 256x2, gamma 0.99, alpha 0.2 on 16 tasks x 64 "
                "rows (official 16 x 256), 40k of the paper's 1M updates; ~50 min on one shared core",
    },
    ("borel-rlrelabel", "GridNavi"): {
        "script": "borel",
        "preset": "borel",
        "args": ["--rl-relabel", "--eval-every", "2500", "--no-cuda"],
        "steps": 50_000,
        "note": "as borel/GridNavi, plus the DQN stage on the relabelled rollouts (the first two episodes of about 63% "
                "of a goal's rollouts come from other goals' agents, scored with its reward), 50k of the 250k DQN "
                "updates; ~35 min per seed on one shared core",
    },
    ("borel-rlrelabel", "PointRobot"): {
        "script": "borel",
        "preset": "default",
        "args": ["--rl-relabel", "--eval-every", "2000", "--no-cuda"],
        "steps": 20_000,
        "note": "as borel/PointRobot, plus the RL stage on the relabelled rollouts (about 63% of a task's episodes "
                "are other tasks' episodes scored with its reward, beliefs recomputed on them); 20k SAC updates; "
                "~35 min per seed on one shared core",
    },
    ("borel-vaelr0.001", "GridNavi"): {
        "script": "borel",
        "preset": "borel",
        "args": ["--vae-lr", "1e-3", "--eval-every", "2500", "--no-cuda"],
        "steps": 250_000,
        "note": "as borel/GridNavi with VariBAD's grid VAE learning rate 1e-3 (official BOReL 3e-4); ~55 min per seed",
    },
    ("borel-cells-vaelr0.001", "GridNavi"): {
        "script": "borel",
        "preset": "borel",
        "args": ["--vae-lr", "1e-3", "--belief-input", "cells", "--eval-every", "2500", "--no-cuda"],
        "steps": 250_000,
        "note": "as borel-vaelr0.001/GridNavi, and the DQN reads the decoded goal probability of each cell instead of "
                "[mu, log sigma^2] (not official); ~55 min per seed on one shared core",
    },
    ("borel-norelabel", "GridNavi"): {
        "script": "borel",
        "preset": "borel",
        "args": ["--no-relabel", "--eval-every", "2500", "--no-cuda"],
        "steps": 250_000,
        "note": "the paper's ablation: the VAE trained without reward relabelling; otherwise as borel/GridNavi",
    },
    ("ldm", "GridNavi"): {
        "preset": "ldm",
        "args": ["--vae-steps", "5000", "--elbo-latents", "30", "--eval-every", "2500", "--no-cuda"],
        "steps": 10_000,
        "note": "offline LDM on the ldm split (18 train / 27 test goals) at the paper's network sizes: VAE 5k ELBO updates "
                "of 25 rollouts with 30 of the 121 latents per rollout (unbiased, 4x cheaper), double DQN on 28 real + "
                "4 imaginary rollouts (n_mix 2/16) for 10k updates; ~25 min per seed on one shared core",
    },
    ("ldm-nomix", "GridNavi"): {
        "script": "ldm",
        "preset": "ldm",
        "args": ["--n-mix", "0", "--eval-every", "2500", "--no-cuda"],
        "steps": 10_000,
        "note": "the paper's comparison (offline RL^2, no imaginary tasks, no VAE); otherwise as ldm/GridNavi; ~12 min per "
                "seed on one shared core",
    },
    ("ldm-mix8", "GridNavi"): {
        "script": "ldm",
        "preset": "ldm",
        "args": ["--n-mix", "8", "--vae-steps", "5000", "--elbo-latents", "30", "--eval-every", "2500", "--no-cuda"],
        "steps": 10_000,
        "note": "sensitivity to the imaginary share: as ldm/GridNavi with 8 of 16 workers imaginary (16 of 32 rollouts, "
                "each mixing 8 tasks' latents); ~25 min per seed on one shared core",
    },
    ("ldm", "PointRobot"): {
        "preset": "default",
        "args": ["--vae-steps", "5000", "--eval-every", "2500", "--no-cuda"],
        "steps": 40_000,
        "note": "offline LDM on the shared PointRobot dataset (k = 1 episode of 20 steps; MuJoCo sizes: latent 5, decoder "
                "64-32 with dropout 0.5; policy GRU 128 with the state, SAC gamma 0.9 alpha 0.01; 24 real + 8 imaginary "
                "rollouts per update, n_mix 4/16); VAE 5k updates with all latents; ~25 min per seed on one shared core",
    },
    ("ldm-relabel", "PointRobot"): {
        "script": "ldm",
        "preset": "default",
        "args": ["--relabel-share", "0.5", "--vae-steps", "5000", "--eval-every", "2500", "--no-cuda"],
        "steps": 150_000,
        "note": "as ldm/PointRobot, plus half of the 24 real rollouts of each update replaced by relabelled ones "
                "(another train task's rollout with this task's true rewards), 150k updates; ~2.5 h per seed with "
                "three runs sharing the 2-core CPU",
    },
    ("ldm-nomix", "PointRobot"): {
        "script": "ldm",
        "preset": "default",
        "args": ["--n-mix", "0", "--eval-every", "2500", "--no-cuda"],
        "steps": 20_000,
        "note": "as ldm/PointRobot without imaginary tasks (offline RL^2 with SAC); ~13 min per seed on one shared core",
    },
    ("ldm", "HalfCheetahVel"): {
        "preset": "ldm-cpu",
        "args": ["--vae-steps", "3000", "--elbo-latents", "10", "--batch-size", "8", "--eval-every", "2500", "--no-cuda"],
        "steps": 35_000,
        "note": "offline LDM on the ldm split at CPU size (20 train velocities in U(0, 0.5) or U(3, 3.5), test 0.25 ... "
                "3.25; k = 2 episodes of 200 steps; the paper's cheetah sizes, n_mix 4/16): VAE 3k ELBO updates with 10 "
                "of the 401 latents per rollout, SAC on 6 real + 2 imaginary 400-step rollouts for 35k updates; "
                "~2 h on one shared core",
    },
    ("ldm-nomix", "HalfCheetahVel"): {
        "script": "ldm",
        "preset": "ldm-cpu",
        "args": ["--n-mix", "0", "--batch-size", "8", "--eval-every", "2500", "--no-cuda"],
        "steps": 35_000,
        "note": "as ldm/HalfCheetahVel without imaginary tasks (offline RL^2 with SAC, 8 real rollouts per update); "
                "~1.8 h on one shared core",
    },
    ("smac", "HalfCheetahVel"): {
        "preset": "cpu",
        "args": ["--eval-every", "5000", "--online-iterations", "0", "--no-cuda"],
        "steps": 50_000,
        "note": "SMAC's offline phase at the paper's sizes (nets 3x300, encoder 3x200, meta-batch 4 x 128, KL 0.1) on the "
                "CPU-sized cheetah dataset (20/10 tasks), the paper's 50k offline steps, no self-supervised phase (each "
                "of its 51 iterations is 16k updates); ~55 min on one shared core",
    },
    ("smac-beta10", "HalfCheetahVel"): {
        "script": "smac",
        "preset": "cpu",
        "args": ["--beta", "10", "--eval-every", "2500", "--online-iterations", "0", "--no-cuda"],
        "steps": 50_000,
        "note": "as smac/HalfCheetahVel with the AWR temperature 10 instead of the official 100 (at 100 the weights stay "
                "near 1 and the actor clones the mixed-quality buffers); evaluations every 2.5k; ~55 min on one "
                "shared core",
    },
    ("smac-tail", "HalfCheetahVel"): {
        "script": "smac",
        "preset": "cpu",
        "args": ["--data-tail", "10000", "--eval-every", "5000", "--online-iterations", "0", "--no-cuda"],
        "steps": 30_000,
        "note": "as smac/HalfCheetahVel with each train task's last 10k offline transitions only (its last 50 of 160 "
                "episodes, near its expert; the official Ant-Dir setting keeps a tail too): beta 100 makes the actor "
                "close to weighted BC of the data; ~45 min on one shared core",
    },
    ("corro", "HalfCheetahVel"): {
        "preset": "cpu",
        "args": ["--cvae-epochs", "2", "--encoder-steps", "20000", "--eval-every", "4000", "--no-cuda"],
        "steps": 40_000,
        "note": "CORRO with the paper's CVAE negatives (fitted on the 20 train tasks) on the CPU-sized cheetah dataset: "
                "CVAE 2 of 100 epochs (10k updates), 20k of 200k InfoNCE updates, SAC 256x2 on 16 tasks x 256 for 40k "
                "of 200k updates. A GPU job: the SAC stage runs ~3-4 updates/s on one shared core (~3 h); on this "
                "data InfoNCE sits at ln 17 (collapsed encoder) with every negative type, see README",
    },
    ("corro-norm", "HalfCheetahVel"): {
        "script": "corro",
        "preset": "cpu",
        "args": ["--negatives", "cvae", "--normalize-inputs", "--cvae-epochs", "20", "--encoder-steps", "20000",
                 "--batch-size", "64", "--eval-every", "5000", "--no-cuda"],
        "steps": 30_000,
        "note": "CORRO with the paper's CVAE negatives (fitted on the 20 train tasks) and the encoder's s, s' "
                "standardised (--normalize-inputs; without it InfoNCE collapses on this data): CVAE 20 of 100 epochs "
                "(100k updates; with 2 epochs one seed in three got a weak encoder, README), 20k of 200k InfoNCE "
                "updates, SAC 256x2 on 16 tasks x 64 rows (official 256) for 30k of 200k updates; ~40 min on one "
                "shared core",
    },
    ("mql", "HalfCheetahVel"): {
        "preset": "cpu",
        "args": ["--eval-every", "5000", "--adapt-every", "20000", "--no-cuda"],
        "steps": 40_000,
        "note": "offline MQL at the paper's cheetah-vel column (actor/critics 300x300, GRU 15, H 20, lr 1e-3) on the "
                "CPU-sized cheetah dataset, 40k of 500k TD3 updates; adaptation at 0, 20k and 40k; ~35 min on one "
                "shared core",
    },
    ("mql-bc", "HalfCheetahVel"): {
        "script": "mql",
        "preset": "cpu",
        "args": ["--bc-alpha", "2.5", "--eval-every", "5000", "--adapt-every", "20000", "--no-cuda"],
        "steps": 40_000,
        "note": "as mql/HalfCheetahVel with the TD3+BC actor term (alpha 2.5), an offline option beyond the paper: plain "
                "offline TD3's test return swings by 50-100 between evaluations on this data; ~50 min on one shared core",
    },
    ("mql-bc-lr0.0003", "HalfCheetahVel"): {
        "script": "mql",
        "preset": "cpu",
        "args": ["--bc-alpha", "2.5", "--lr", "3e-4", "--eval-every", "5000", "--adapt-every", "20000", "--no-cuda"],
        "steps": 40_000,
        "note": "as mql-bc/HalfCheetahVel with lr 3e-4 (the paper's cheetah-dir and ant columns) instead of the "
                "cheetah-vel column's 1e-3; ~50 min on one shared core",
    },
}

# The (env_id, preset) pairs every method is benchmarked on.
REFERENCE_ENVS: list[tuple[str, str]] = [
    ("PointRobot", "default"),
    ("SparsePointRobot", "default"),
    ("GridNavi", "borel"),
    ("GridNavi", "ldm"),
    ("HalfCheetahVel", "cpu"),
    ("HalfCheetahVel", "ldm-cpu"),
]
