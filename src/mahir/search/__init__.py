"""Finding the fastest artifact within the quality budget: candidates (recipes x runtimes),
the builder, the budget, successive halving over measured rungs, the records of each outcome,
and the commands built on them (optimize, apply, bench)."""
