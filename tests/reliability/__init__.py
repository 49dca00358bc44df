"""Reliability tier: fault and bad-input drills (issue 10). Each test reproduces a failure
that once went unnoticed and checks the fixed behaviour with numbers."""
