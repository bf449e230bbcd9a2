"""infalign-jax: inference-aware alignment of language models in JAX.

The data path is one straight line:
prompts -> samples -> rewards -> calibration -> transform -> RL step -> evaluation.

Layers (a module imports only from its own layer or those below; tests/test_layers.py checks it):

| layer | folders           | what                                                                |
|-------|-------------------|---------------------------------------------------------------------|
| 0     | core/, infra/     | pure maths and shared types; sharding, checkpoints, configs, runs   |
| 1     | models/, data/    | the Flax decoder and its importers; readers, tokenising, loaders    |
| 2     | decoding/         | the sampler and controlled decoding                                 |
| 3     | rewards/          | text judges, reward models, prefix scorers                          |
| 4     | analysis/         | the analytic tool, win-rate / KL estimates, the evaluation harness  |
| 5     | rl/               | the RL step (phases), BoN distillation, calibration pass, tasks     |
| 6     | loops/            | the run loops: policy training, reward-model training               |
| 7     | workflows/        | orchestration: demo, reproduction, sweeps, reports, calibration     |

Shape letters. Array names end in their shape, e.g. `logp_RxL`; each letter has one meaning:

    B  batch rows: prompts in a step, pairs or sequences in a batch (table rows in a sharded pass)
    N  samples per prompt drawn in one call; the N of Best-of-N / Worst-of-N
    R  rollout rows, R = B * N (one row per sampled response)
    M  responses per prompt scored or compared (calibration, win-rate estimates)
    K  base-policy samples per prompt in the reference (calibration) table
    X  prompts of a task or table (all of them, not one batch)
    Y  enumerated responses of the exact task
    P  prompt length (tokens)
    L  response length (tokens; max_new_tokens)
    T  sequence positions, T = P + L (keys, in attention)
    S  positions fed in this call (queries: S = T for a full forward, 1 when decoding)
    V  vocabulary;  D  model width (or head width next to H);  H  attention heads
    E  ensemble members;  G  the N values evaluated together (ns)
    U  points of the analytic tool's grid on [0, 1];  Q  quadrature nodes;  W  Anderson memory
    J  candidate next tokens of a prefix scorer (its top-k)
    C  chunks of a calibration pass;  O, I  output and input features of a weight matrix
"""

__version__ = "0.1.0"

LAYERS = {"core": 0, "infra": 0, "models": 1, "data": 1, "decoding": 2, "rewards": 3,
          "analysis": 4, "rl": 5, "loops": 6, "workflows": 7}
