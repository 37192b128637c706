"""CVXQ's bit allocation: the units and their gradient statistics on the stages
(`sensitivity`), the budget's units and side information (`budget`), and the solver
(`allocation`, pure); the FP model's statistics kept in the user cache across runs
(`statistics_cache`)."""
