"""The DAG, its compile/submit/schedule front ends and the ``recml`` CLI."""
