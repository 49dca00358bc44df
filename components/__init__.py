"""Pipeline steps: each module holds a step's logic as a plain ``run(...)`` and a thin KFP component."""
