"""Optimizers that keep bf16 weights moving (Kahan-compensated, fp32 master, 8-bit with stochastic
rounding) and the size of every optimizer's states, for the planner."""
