# %% [markdown]
# # Quickstart: Online Subspace Descent in an optax loop
#
# **Online Subspace Descent** (OSD; Liang, Liu, Chen & Liu, 2024, [arXiv:2408.12857](https://arxiv.org/abs/2408.12857))
# keeps the optimizer state of every weight matrix in a rank-$r$ subspace. For a weight $W$ with gradient
# $G_t \in \mathbb{R}^{s\times L}$ (oriented so that $s \le L$) and a projector $P_t \in \mathbb{R}^{s\times r}$:
#
# $$\hat G_t = P_t^\top G_t,\qquad N_t = \mathrm{Adam}(\hat G_t),\qquad W_{t+1} = W_t - \eta_t\,(P_t N_t + \mathrm{wd}\cdot W_t).$$
#
# Adam's two moments live in $r\times L$ instead of $s\times L$. GaLore refreshes $P$ by an SVD of $G_t$ every $T$ steps;
# OSD instead takes **one optimizer step per training step on an online-PCA loss**:
#
# $$\mathcal L(P) = \|P P^\top \tilde G_t - \tilde G_t\|_F^2 + \lambda\,\|P^\top P - I_r\|_F^2,\quad \tilde G_t = G_t/\|G_t\|_F,
# \qquad P_{t+1} = P_t - \alpha\,\eta_t\,\mathrm{Adam}_P\big(\nabla\mathcal L(P_t)\big).$$
#
# This notebook trains a small MLP with `osd_jax.osd_adamw`, compares it with `optax.adamw` and GaLore,
# measures the optimizer-state memory, and swaps the inner optimizer and the projector rule.

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import osd_jax

print("jax", jax.__version__, "| optax", optax.__version__, "| osd_jax", osd_jax.__version__,
      "|", jax.devices()[0].platform)

# %% [markdown]
# ## A small problem: teacher-student regression
#
# A random two-layer teacher $y = \tanh(xA)B$ generates targets; a student MLP with the same shapes
# learns them from mini-batches. The student has two matrices, `w1` (64×256) and `w2` (256×32), and two
# bias vectors. With rank $r=8$ the matrices are projected (`w1` on its 64-row side, `w2` on its 32-column side),
# the biases get plain AdamW.

# %%
D_IN, D_HIDDEN, D_OUT, N, BATCH, RANK = 64, 256, 32, 4096, 128, 8
k_x, k_a, k_b, k_noise, k_init = jax.random.split(jax.random.PRNGKey(0), 5)


def mlp(params, x):
  return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def init_params(key):
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (D_IN, D_HIDDEN)) / jnp.sqrt(D_IN), "b1": jnp.zeros(D_HIDDEN),
          "w2": jax.random.normal(k2, (D_HIDDEN, D_OUT)) / jnp.sqrt(D_HIDDEN), "b2": jnp.zeros(D_OUT)}


teacher = init_params(k_a)
X = jax.random.normal(k_x, (N, D_IN))
Y = mlp(teacher, X) + 0.01 * jax.random.normal(k_noise, (N, D_OUT))


def loss_fn(params, x, y):
  return jnp.mean((mlp(params, x) - y) ** 2)


print({k: v.shape for k, v in init_params(k_init).items()})

# %% [markdown]
# ## The optax loop
#
# `osd_adamw` is an ordinary `optax.GradientTransformation`, so the loop is the usual one:
# `tx.init(params)`, then `tx.update(grads, state, params)` and `optax.apply_updates`. The loop below is
# jitted once per optimizer and samples a fresh mini-batch every step.

# %%
STEPS = 600


def fit(tx, steps=STEPS, seed=0):
  """Trains a fresh student with ``tx``; returns (mini-batch losses, final params, final opt state)."""
  params = init_params(k_init)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, key):
    idx = jax.random.randint(key, (BATCH,), 0, N)
    loss, grads = jax.value_and_grad(loss_fn)(params, X[idx], Y[idx])
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for key in jax.random.split(jax.random.PRNGKey(seed), steps):
    params, opt_state, loss = step(params, opt_state, key)
    losses.append(loss)
  return np.asarray(losses), params, opt_state


LR = 3e-3
optimizers = {
    "optax.adamw": optax.adamw(LR, weight_decay=0.0),
    "osd_adamw (r=8)": osd_jax.osd_adamw(LR, rank=RANK),
    "galore_adamw (r=8, T=50)": osd_jax.galore_adamw(LR, rank=RANK, update_proj_gap=50, scale=1.0),
}
runs = {}
for name, tx in optimizers.items():
  t0 = time.time()
  runs[name] = fit(tx)
  print(f"{name:26s} final loss {runs[name][0][-20:].mean():.4f}   ({time.time() - t0:.1f} s)")

# %%
def smooth(x, k=20):
  return np.convolve(x, np.ones(k) / k, mode="valid")


def plot_runs(ax, runs, title):
  for name, (losses, _, _) in runs.items():
    ax.semilogy(np.arange(len(smooth(losses))) + 20, smooth(losses), label=name)
  ax.set(xlabel="step", ylabel="mini-batch MSE (moving average of 20)", title=title)
  ax.grid(alpha=0.3)
  ax.legend(loc="upper right")


fig, ax = plt.subplots(figsize=(7, 4))
plot_runs(ax, runs, "Full-rank AdamW vs rank-8 subspace methods")
plt.show()

# %% [markdown]
# Both subspace methods train with about a fifth of AdamW's optimizer state (see below) and end above full-rank AdamW on this
# small problem. GaLore descends in a staircase: its $P$ is refit every $T = 50$ steps and is stale in between. OSD's
# $P$ moves every step, so its curve has no steps; it does not end lower here, though: its final loss (printed above)
# is slightly above GaLore's. One run of a small problem does not rank the two methods.
#
# GaLore is run here with `scale=1.0` so that the three optimizers take steps of the same size (its default
# `scale=0.25` follows the GaLore paper, which pairs it with a larger learning rate).
#
# ## What the state holds
#
# For each projected matrix the state holds the projector $P$ ($s\times r$), the inner Adam moments in
# $r\times L$ coordinates and, for OSD, the Adam moments of $P$'s own optimizer. The shapes:

# %%
_, _, osd_state = runs["osd_adamw (r=8)"]
print(jax.tree.map(lambda a: a.shape, osd_state[0]))

# %% [markdown]
# `osd_jax.state_bytes` counts the bytes of every array in a state; `osd_jax.expected_state_bytes` gives the same
# number in closed form from the parameter shapes alone (per projected matrix, osd_adamw stores
# $2rL$ moment entries plus $3sr$ for $P$ and its Adam moments):

# %%
params0 = init_params(k_init)
names = {"optax.adamw": "adamw", "osd_adamw (r=8)": "osd_adamw", "galore_adamw (r=8, T=50)": "galore_adamw"}
adamw_bytes = osd_jax.state_bytes(runs["optax.adamw"][2])
print(f"{'optimizer':26s} {'state_bytes':>12s} {'expected':>10s} {'vs adamw':>9s}")
for name, alias in names.items():
  measured = osd_jax.state_bytes(runs[name][2])
  expected = osd_jax.expected_state_bytes(params0, rank=RANK, optimizer=alias)
  print(f"{name:26s} {measured:12,d} {expected:10,d} {measured / adamw_bytes:9.2f}")
  assert measured == expected

# %% [markdown]
# The ratio improves as matrices grow relative to $r$: for a 4096×4096 matrix at $r = 128$, AdamW keeps
# $2\cdot 4096^2$ floats, OSD keeps $2\cdot 128\cdot 4096 + 3\cdot 4096\cdot 128$ (about 13× less) and GaLore
# $2\cdot 128\cdot 4096 + 4096\cdot 128$ (about 21× less).
# `expected_state_bytes` works on `jax.ShapeDtypeStruct`s, so it can size a model without allocating it:

# %%
big = {"w": jax.ShapeDtypeStruct((4096, 4096), jnp.float32)}
for alias in ("adamw", "galore_adamw", "osd_adamw"):
  print(f"{alias:13s} {osd_jax.expected_state_bytes(big, rank=128, optimizer=alias) / 2**20:7.1f} MiB")

# %% [markdown]
# ## Swapping the inner optimizer and the projector rule
#
# The inner optimizer is any optax transformation that needs no parameters. `osd_lion` is OSD with
# Lion inside ($N_t = \mathrm{sign}(\cdot)$ of Lion's interpolated momentum), one line. Lion's steps are
# sign-sized, so it wants a smaller learning rate:

# %%
swaps = {"osd_lion (r=8)": osd_jax.osd_lion(LR / 5, rank=RANK)}

# %% [markdown]
# The general building block `scale_by_subspace_descent(inner, rank, projector)` takes any inner optimizer and
# any projector rule; the aliases are built from it. With a small helper, each projector rule is one line:
# online PCA (OSD's, here with the step $\alpha\eta = 5\cdot$ lr), an SVD every $T$ steps (GaLore's rule),
# a fresh random subspace every $T$ steps, or $P_0$ frozen forever.

# %%
def subspace_adamw(projector, inner=None):
  return optax.chain(
      osd_jax.scale_by_subspace_descent(inner or optax.scale_by_adam(), rank=RANK, projector=projector),
      optax.scale_by_learning_rate(LR))


P = osd_jax.projectors
swaps["online_pca (α=5)"] = subspace_adamw(P.online_pca(learning_rate=5 * LR))
swaps["svd every 50"] = subspace_adamw(P.svd(every=50))
swaps["random every 50"] = subspace_adamw(P.random(every=50))
swaps["frozen P₀"] = subspace_adamw(P.frozen())

# %%
swap_runs = {}
for name, tx in swaps.items():
  swap_runs[name] = fit(tx)
  print(f"{name:18s} final loss {swap_runs[name][0][-20:].mean():.4f}")

fig, axes = plt.subplots(1, 2, figsize=(13, 4), sharey=True)
plot_runs(axes[0], runs, "Baselines")
plot_runs(axes[1], swap_runs, "Inner optimizer and projector rule swapped")
plt.tight_layout()
plt.show()

# %% [markdown]
# A projector that follows the gradient (online PCA, periodic SVD) learns much faster than one that ignores it
# (random) or never moves (frozen). The projectors can be read out of any state; online PCA's $P$ is only
# approximately orthonormal (the $\lambda$ term keeps it close):

# %%
for name in ("online_pca (α=5)", "svd every 50"):
  state = swap_runs[name][2]
  shapes = [p.shape for p in osd_jax.projectors_of(state)]
  err = float(osd_jax.projector_orthogonality_error(state))
  print(f"{name:18s} projectors {shapes}   mean ‖PᵀP − I‖_F = {err:.2e}")

# %% [markdown]
# Next: [02_subspace_tracking.ipynb](02_subspace_tracking.ipynb) shows *why* online PCA works, on gradients with
# a known rotating subspace; [03_llama_tiny.ipynb](03_llama_tiny.ipynb) trains a small LLaMA with the bundled
# trainer.
