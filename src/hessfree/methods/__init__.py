"""Score methods: pure math over the gradient engine."""
