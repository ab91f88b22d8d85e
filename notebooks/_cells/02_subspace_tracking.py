# %% [markdown]
# # Subspace tracking: online PCA vs periodic SVD vs random
#
# Subspace methods keep the optimizer state of a weight matrix in the span of a projector $P_t\in\mathbb R^{s\times r}$.
# They work when $P_t$ spans the directions in which the gradients $G_t\in\mathbb R^{s\times L}$ actually live, and
# during training those directions **drift**. GaLore re-fits $P$ by an SVD of one gradient every $T$ steps; Online
# Subspace Descent (Liang et al., 2024) lets $P$ follow the drift continuously by taking one optimizer step per
# training step on the online-PCA loss
#
# $$\mathcal L(P) = \|P P^\top \tilde G_t - \tilde G_t\|_F^2 + \lambda\,\|P^\top P - I_r\|_F^2,\qquad \tilde G_t = G_t/\|G_t\|_F,$$
#
# $$P_{t+1} = P_t - \alpha\,\eta_t\,\mathrm{Adam}_P\big(\nabla\mathcal L(P_t)\big).$$
#
# Here we build gradients whose top-$r$ subspace is **known** and rotates slowly, run the projector rules of
# `osd_jax.projectors` on them directly, and measure how far each $P_t$ is from the truth.

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from osd_jax import projectors

# %% [markdown]
# ## Gradients with a known, rotating subspace
#
# Let $U_0\in\mathbb R^{s\times r}$ be orthonormal and $R = \exp(\theta K)$ a rotation of $\mathbb R^s$
# ($K$ skew-symmetric, $\theta$ small). The true subspace at step $t$ is $U_t = R^t U_0$ and the gradient is
#
# $$G_t = U_t\,\Sigma\,Z_t^\top + \nu\,E_t,\qquad Z_t\in\mathbb R^{L\times r},\ E_t\in\mathbb R^{s\times L}\ \text{Gaussian},$$
#
# so $\mathbb E[G_tG_t^\top] \propto U_t\Sigma^2U_t^\top + \nu^2 I$ has top-$r$ eigenspace exactly $U_t$, but any single
# $G_t$ is noisy: the SVD of one gradient only estimates $U_t$.

# %%
S, L, R, STEPS = 64, 256, 4, 400
SIGMA = jnp.array([2.0, 1.6, 1.3, 1.0])  # Σ: signal strength of the r true directions
NU = 0.6  # ν: noise level
THETA = 5e-3  # θ: rotation per step (see the measured angle below)

k_u, k_k = jax.random.split(jax.random.PRNGKey(0))
U0, _ = jnp.linalg.qr(jax.random.normal(k_u, (S, R)))
B = jax.random.normal(k_k, (S, S))
K = (B - B.T) / jnp.linalg.norm(B - B.T, ord=2)  # skew-symmetric, spectral norm 1
ROT = jax.scipy.linalg.expm(THETA * K)  # orthogonal: U_{t+1} = ROT @ U_t


def gradient(u, key):
  kz, ke = jax.random.split(key)
  z = jax.random.normal(kz, (L, R)) / jnp.sqrt(L)
  e = jax.random.normal(ke, (S, L)) / jnp.sqrt(L)
  return u @ jnp.diag(SIGMA) @ z.T + NU * e


def principal_angles(p, u):
  """Principal angles (degrees, ascending) between span(p) and span(u); p need not be orthonormal."""
  q, _ = jnp.linalg.qr(p)
  cos = jnp.linalg.svd(q.T @ u, compute_uv=False)
  return jnp.degrees(jnp.arccos(jnp.clip(cos, -1.0, 1.0)))[::-1]


u_end = jnp.linalg.matrix_power(ROT, STEPS) @ U0
print(f"true subspace moves {float(principal_angles(ROT @ U0, U0)[-1]):.3f}° per step (largest angle); "
      f"after {STEPS} steps it is {float(principal_angles(u_end, U0)[-1]):.1f}° from U_0")
svd_floor = np.mean([principal_angles(projectors.top_singular_subspace(gradient(U0, k), R), U0)[-1]
                     for k in jax.random.split(jax.random.PRNGKey(1), 20)])
print(f"the top-{R} SVD of one gradient is on average {svd_floor:.1f}° from the truth "
      "(the noise floor of a single-gradient SVD)")

# %% [markdown]
# ## Running a projector rule directly
#
# A projector rule is a pair of pure functions acting on one matrix:
# `state = rule.init(s, L, r, dtype)` and `p_t, g_hat, state = rule.update(g, state, t, key)`, which returns the $P_t$
# used at step $t$, the projected gradient $\hat G_t = P_t^\top G_t$, and the state holding $P_{t+1}$.
# `scale_by_subspace_descent` calls exactly these; here we call them ourselves inside one `lax.scan`, recording at every
# step the principal angles between $P_t$ and $U_t$, the orthogonality error $\|P_t^\top P_t - I_r\|_F$, and the
# **captured energy** $\|Q_t^\top G_t\|_F^2/\|G_t\|_F^2$ ($Q_t$ an orthonormal basis of $P_t$): the fraction of the
# gradient the optimizer actually sees, what `osd_jax.captured_energy` computes and the trainer logs.

# %%
def captured(p, g):
  """‖QᵀG‖²/‖G‖² with Q an orthonormal basis of span(p)."""
  q, _ = jnp.linalg.qr(p)
  return jnp.sum((q.T @ g) ** 2) / jnp.sum(g**2)


def track(rule, steps=STEPS, seed=2):
  """Runs ``rule`` on the rotating gradients; per step: largest angle [deg], ‖PᵀP − I‖_F, energy."""

  def body(carry, t):
    u, state = carry
    key = jax.random.fold_in(jax.random.PRNGKey(seed), t)
    g = gradient(u, key)
    p, _, state = rule.update(g, state, t, jax.random.fold_in(key, 1))  # P_t, Ĝ_t, state with P_{t+1}
    angles = principal_angles(p, u)
    orth = jnp.linalg.norm(p.T @ p - jnp.eye(R))
    return (ROT @ u, state), (angles[-1], orth, captured(p, g))

  state = rule.init(S, L, R, jnp.float32)
  _, (angle, orth, energy) = jax.lax.scan(body, (U0, state), jnp.arange(steps))
  return angle, orth, energy


# The online-PCA step size and λ enter as traced arguments, so all of its settings share one compilation.
track_online_pca = jax.jit(lambda eta, lam: track(projectors.online_pca(eta, orthogonality_weight=lam)))

LR = 1e-3  # the training learning rate η; the projector's step is α·η
results = {}
t0 = time.time()
for alpha, lam in [(1, 0.1), (5, 0.1), (20, 0.1), (5, 0.0), (5, 1.0)]:
  results[f"online PCA α={alpha}, λ={lam:g}"] = track_online_pca(alpha * LR, lam)


def track_jit(rule):
  return jax.jit(lambda: track(rule))()


for every in (20, 100):
  results[f"SVD every T={every}"] = track_jit(projectors.svd(every=every))
results["random every 20"] = track_jit(projectors.random(every=20))
results["frozen P₀ (SVD of G₀)"] = track_jit(projectors.frozen())
results = {k: tuple(map(np.asarray, v)) for k, v in results.items()}
print(f"{len(results)} rules x {STEPS} steps in {time.time() - t0:.1f} s\n")
print(f"{'':26s} {'mean angle':>10s}   {'‖PᵀP − I‖_F':^27s}   {'energy':>6s}")
print(f"{'rule':26s} {'2nd half':>10s}   {'max':>6s} {'at step':>7s} {'mean 2nd half':>13s}   "
      f"{'mean':>6s}")
for name, (angle, orth, energy) in results.items():
  print(f"{name:26s} {angle[STEPS // 2:].mean():9.1f}°   {orth.max():6.3f} {int(orth.argmax()):7d} "
        f"{orth[STEPS // 2:].mean():13.4f}   {energy.mean():6.3f}")

# %% [markdown]
# ## Principal angle between $P_t$ and the true subspace $U_t$
#
# The largest principal angle is 0° when $\mathrm{span}(P_t) = \mathrm{span}(U_t)$ and 90° when some true direction is
# missed completely.

# %%
def smooth(x, k=10):
  return np.convolve(x, np.ones(k) / k, mode="valid")


groups = {
    "online PCA: step size α (λ = 0.1)": [k for k in results if k.startswith("online PCA") and "λ=0.1" in k],
    "online PCA: orthogonality weight λ (α = 5)": [k for k in results if k.startswith("online PCA α=5")],
    "GaLore: SVD every T steps, random, frozen": [k for k in results if not k.startswith("online")],
}
fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
for ax, (title, keys) in zip(axes, groups.items()):
  for k in keys:
    ax.plot(results[k][0] if "SVD" in k else smooth(results[k][0]), label=k, lw=1.2)
  ax.axhline(svd_floor, color="k", ls=":", lw=1, label="SVD of one gradient (mean)")
  ax.set(title=title, xlabel="step t", ylim=(0, 10) if "online" in title else (0, 92))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
for ax in axes:
  ax.set_ylabel("largest principal angle ∠(P_t, U_t) [deg]")
plt.tight_layout()
plt.show()

# %% [markdown]
# What the plots show:
#
# * **Online PCA** starts from the SVD of $G_0$ (the single-gradient noise floor) and then *improves* on it: each step
#   moves $P$ a little towards the top subspace of the current gradient, so $P_t$ averages many noisy gradients while
#   following the rotation. A small $\alpha$ takes longer to settle (and would lag a faster rotation); a large
#   $\alpha$ lets $P$ chase the noise of each gradient and settles higher. The weight $\lambda$ barely changes the
#   angle: it acts on the orthogonality of $P$ (next plot), not on its span.
# * **Periodic SVD** is exact only up to the noise of the one gradient it sees (the dotted line), and then goes stale
#   while the subspace turns: a sawtooth whose teeth grow with $T$. Even an SVD every step would stay at the dotted
#   line, since it never averages.
# * A **random** subspace misses almost everything (in $\mathbb R^{64}$ a random 4-dimensional subspace is nearly
#   orthogonal to any fixed one), and a **frozen** $P_0$ slowly loses the rotating subspace.
#
# ## Orthogonality $\|P_t^\top P_t - I_r\|_F$
#
# SVD, random and frozen projectors are orthonormal by construction (up to float32 rounding). Online PCA's $P$ is a
# free matrix that starts orthonormal; every step nudges it off, and the penalty $\lambda\|P^\top P - I\|^2$ pulls it
# back. The table shows two phases. Every online-PCA maximum (the "max" column) falls in the first 20 steps ("at step"), a
# transient in which the order is *not* that of $\lambda$: at $\alpha = 5$, $\lambda = 1$ peaks highest, then
# $\lambda = 0$, then $\lambda = 0.1$. Once settled (the second-half means, and the plot below) the order is that of
# $\lambda$: the error is smallest for $\lambda = 1$ and largest for $\lambda = 0$, where only the reconstruction term
# (which also favours an orthonormal $P$ in the directions the gradient occupies) holds it. Larger steps
# ($\alpha = 20$) push it further off in both phases. All of these errors stay far below 1.

# %%
fig, ax = plt.subplots(figsize=(7, 4))
for k in results:
  if k.startswith("online"):
    ax.semilogy(results[k][1], label=k, lw=1.2)
ax.semilogy(np.maximum(results["SVD every T=20"][1], 1e-8), label="SVD every T=20", color="gray", lw=1)
ax.set(xlabel="step t", ylabel="‖PᵀP − I‖_F", title="Distance of P from orthonormal")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## Captured energy: how much of each gradient the optimizer sees
#
# The inner optimizer only ever sees $P_t^\top G_t$; the captured energy $\|Q_t^\top G_t\|^2/\|G_t\|^2$ is the share of the
# gradient that survives the projection. The ceiling (dashed) is the top-$r$ SVD of $G_t$ itself, the best any
# rank-$r$ projector could do for that one gradient. This is the paper's mechanism: online PCA should keep capturing
# more than a $P$ refreshed only every $T$ steps, whose share decays as the subspace turns away between refreshes.

# %%
ceiling = np.mean([float(captured(projectors.top_singular_subspace(g, R), g)) for g in
                   [gradient(U0, k) for k in jax.random.split(jax.random.PRNGKey(4), 20)]])
fig, ax = plt.subplots(figsize=(8, 4))
for k in ["online PCA α=5, λ=0.1", "SVD every T=20", "SVD every T=100", "random every 20",
          "frozen P₀ (SVD of G₀)"]:
  ax.plot(smooth(results[k][2]) if k.startswith("online") else results[k][2], label=k, lw=1.2)
ax.axhline(ceiling, color="k", ls="--", lw=1, label="top-r SVD of G_t itself (ceiling)")
ax.set(xlabel="step t", ylabel="‖QᵀG‖² / ‖G‖²", title="Captured energy of each gradient", ylim=(0, 1))
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## Cost per update
#
# Online PCA needs a few $s\times L\times r$ matrix products per step (no $s\times s$ or $L\times L$ matrix); an SVD
# costs $O(s^2L)$. On a 256×1024 gradient with $r = 16$ (wall-clock on this machine's CPU):

# %%
g_big = jax.random.normal(jax.random.PRNGKey(3), (256, 1024))
rules = {"online PCA step": projectors.online_pca(5e-3), "SVD refresh": projectors.svd(every=1)}
for name, rule in rules.items():
  state = rule.init(256, 1024, 16, jnp.float32)
  upd = jax.jit(rule.update)
  _, _, state = upd(g_big, state, jnp.int32(0), jax.random.PRNGKey(0))  # step 0: P₀ by SVD for both
  jax.block_until_ready(upd(g_big, state, jnp.int32(1), jax.random.PRNGKey(0)))  # compile
  t0 = time.perf_counter()
  for _ in range(5):
    out = upd(g_big, state, jnp.int32(1), jax.random.PRNGKey(0))
  jax.block_until_ready(out)
  print(f"{name:16s} {(time.perf_counter() - t0) / 5 * 1e3:8.2f} ms per update")

# %% [markdown]
# The SVD is why GaLore refreshes only every few hundred steps, and why its projector goes stale in between. Online
# PCA is cheap enough to run every step, which is what lets OSD follow the subspace as it moves. For the effect on
# training, see [01_quickstart.ipynb](01_quickstart.ipynb) and [03_llama_tiny.ipynb](03_llama_tiny.ipynb).
