"""Runtime: execute rewritten graphs."""
